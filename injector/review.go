package injector

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"

	admissionv1 "k8s.io/api/admission/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// reviewError is a request that is not an AdmissionReview the webhook can answer: it gets an
// HTTP error status and a plain-text message, not an AdmissionReview.
type reviewError struct {
	status int
	msg    string
}

func (e *reviewError) Error() string { return e.msg }

// review answers one AdmissionReview v1 body. It returns the response body, the result for the
// metrics and logs, the decision (for logging), or a *reviewError for a malformed request.
func (in *Injector) review(body []byte) ([]byte, Decision, error) {
	var ar admissionv1.AdmissionReview
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(&ar); err != nil {
		return nil, Decision{}, &reviewError{http.StatusBadRequest, "injector: the body is not an AdmissionReview (JSON): " + err.Error()}
	}
	if dec.More() {
		return nil, Decision{}, &reviewError{http.StatusBadRequest, "injector: trailing data after the AdmissionReview"}
	}
	if ar.APIVersion != admissionv1.SchemeGroupVersion.String() || ar.Kind != "AdmissionReview" {
		return nil, Decision{}, &reviewError{http.StatusBadRequest, fmt.Sprintf(
			"injector: want apiVersion %s and kind AdmissionReview, got apiVersion %q kind %q",
			admissionv1.SchemeGroupVersion, ar.APIVersion, ar.Kind)}
	}
	req := ar.Request
	if req == nil {
		return nil, Decision{}, &reviewError{http.StatusBadRequest, "injector: the AdmissionReview has no request"}
	}
	if req.UID == "" {
		return nil, Decision{}, &reviewError{http.StatusBadRequest, "injector: the AdmissionReview's request has no uid"}
	}
	resp, d := in.respond(req)
	resp.UID = req.UID
	if d.Namespace == "" && d.Name == "" {
		d.Namespace, d.Name = req.Namespace, req.Name
	}
	out, err := json.Marshal(admissionv1.AdmissionReview{TypeMeta: ar.TypeMeta, Response: resp})
	if err != nil {
		return nil, Decision{}, fmt.Errorf("injector: encode response: %w", err)
	}
	return out, d, nil
}

var podResource = metav1.GroupVersionResource{Version: "v1", Resource: "pods"}

// respond decides one well-formed request. Requests the webhook should never have been sent
// (another resource, a subresource, an operation other than CREATE) are allowed unchanged with a
// warning, as a misconfigured webhook must not block objects it has no business with; a pod it
// cannot decode, or a denial, is refused (allowed: false) with the reason.
func (in *Injector) respond(req *admissionv1.AdmissionRequest) (*admissionv1.AdmissionResponse, Decision) {
	if req.Resource != podResource || req.SubResource != "" || req.Kind.Kind != "Pod" {
		d := Decision{Result: ResultSkipped, Reason: fmt.Sprintf("not a pod: resource %s, subresource %q, kind %s", req.Resource.String(), req.SubResource, req.Kind.Kind)}
		return &admissionv1.AdmissionResponse{Allowed: true, Warnings: []string{"escrow injector: ignored, " + d.Reason}}, d
	}
	if req.Operation != admissionv1.Create {
		d := Decision{Result: ResultSkipped, Reason: "operation " + string(req.Operation) + ": pods are injected at CREATE only"}
		return &admissionv1.AdmissionResponse{Allowed: true, Warnings: []string{"escrow injector: ignored, " + d.Reason}}, d
	}
	if len(req.Object.Raw) == 0 {
		d := Decision{Result: ResultError, Reason: "the request carries no object"}
		return deny(http.StatusBadRequest, "escrow injector: "+d.Reason), d
	}
	patch, d, err := in.Patch(req.Object.Raw, req.Namespace)
	switch {
	case err != nil:
		d.Reason = err.Error()
		code := http.StatusInternalServerError
		var se *json.SyntaxError
		var te *json.UnmarshalTypeError
		if errors.As(err, &se) || errors.As(err, &te) {
			code = http.StatusBadRequest
		}
		return deny(int32(code), forUser(err.Error())), d
	case d.Result == ResultDenied:
		return deny(http.StatusBadRequest, forUser(d.Reason)), d
	case patch == nil:
		return &admissionv1.AdmissionResponse{Allowed: true}, d
	}
	pt := admissionv1.PatchTypeJSONPatch
	return &admissionv1.AdmissionResponse{Allowed: true, Patch: patch, PatchType: &pt}, d
}

// forUser is the text kubectl shows for a refusal: one "escrow injector: " prefix, whether or
// not the reason carries the package's own "injector: " prefix.
func forUser(reason string) string {
	return "escrow injector: " + strings.TrimPrefix(reason, "injector: ")
}

func deny(code int32, msg string) *admissionv1.AdmissionResponse {
	reason := metav1.StatusReasonBadRequest
	if code >= 500 {
		reason = metav1.StatusReasonInternalError
	}
	return &admissionv1.AdmissionResponse{Allowed: false, Result: &metav1.Status{
		Status: metav1.StatusFailure, Code: code, Message: msg, Reason: reason,
	}}
}
