# The escrow image: one static binary (the sidecar proxy and the admission webhook), non-root, on
# an empty base with only the system CA roots (escrow writes them into the agent's trust bundle)
# and a passwd entry for the non-root user. Built with the same flags as `make build`.
#
#   docker build --build-arg VERSION=$(git describe --tags --always) -t escrow/escrow:TAG .
ARG GO_VERSION=1.26

FROM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/escrow ./cmd/escrow
RUN mkdir -p /out/etc /out/var/run/escrow \
 && echo 'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' > /out/etc/passwd \
 && echo 'nonroot:x:65532:' > /out/etc/group

FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/etc/passwd /out/etc/group /etc/
COPY --from=build --chown=65532:65532 /out/var/run/escrow /var/run/escrow
COPY --from=build /out/escrow /usr/local/bin/escrow
USER 65532:65532
# 15480: the proxy (loopback in a pod); 15481: /healthz /readyz /metrics; 8443: the webhook.
EXPOSE 15481 8443
ENTRYPOINT ["/usr/local/bin/escrow"]
CMD ["proxy", "--config", "/etc/escrow/config/config.yaml"]
