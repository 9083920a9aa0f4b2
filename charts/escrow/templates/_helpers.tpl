{{/* Names */}}
{{- define "escrow.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "escrow.webhookName" -}}
{{- printf "%s-webhook" (include "escrow.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "escrow.tlsSecretName" -}}
{{- printf "%s-webhook-tls" (include "escrow.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "escrow.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "escrow.webhookSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: webhook
{{- end -}}

{{/* The image, by digest when one is given. */}}
{{- define "escrow.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Namespaces the webhook never sees: the release namespace and webhook.excludeNamespaces. */}}
{{- define "escrow.excludedNamespaces" -}}
{{- $ns := list .Release.Namespace -}}
{{- range .Values.webhook.excludeNamespaces -}}
{{- if not (has . $ns) -}}{{- $ns = append $ns . -}}{{- end -}}
{{- end -}}
{{- toJson $ns -}}
{{- end -}}

{{- define "escrow.configMapName" -}}
{{- printf "%s-config" (include "escrow.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "escrow.processConfigMapName" -}}
{{- printf "%s-config-process" (include "escrow.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "escrow.policiesConfigMapName" -}}
{{- printf "%s-policies" (include "escrow.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "escrow.injectorConfigMapName" -}}
{{- printf "%s-injector" (include "escrow.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The restricted Pod Security profile, for the chart's own containers. */}}
{{- define "escrow.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "escrow.controllerName" -}}
{{- printf "%s-controller" (include "escrow.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "escrow.controllerSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{/* The controller's ADS address as sidecars dial it: its Service's cluster DNS name. */}}
{{- define "escrow.controllerAddress" -}}
{{- printf "%s.%s.svc:%d" (include "escrow.controllerName" .) .Release.Namespace (int .Values.controller.port) -}}
{{- end -}}

{{/* The SPIFFE Workload API socket's volume, as the injector mounts it into sidecars
(sidecar.spiffe): the SPIFFE CSI driver, read-only, or a node directory. */}}
{{- define "escrow.spiffeVolume" -}}
{{- $sp := .Values.sidecar.spiffe -}}
{{- if eq $sp.source "csi" -}}
csi:
  driver: {{ $sp.csiDriver }}
  readOnly: true
{{- else -}}
hostPath:
  path: {{ required "sidecar.spiffe.hostPath is required with source hostPath" $sp.hostPath }}
  type: Directory
{{- end -}}
{{- end -}}
