{{/* Names and labels shared by the templates. */}}

{{- define "kubetoll.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetoll.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kubetoll.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "kubetoll.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetoll
{{- end -}}

{{- define "kubetoll.operatorSelector" -}}
app.kubernetes.io/name: {{ include "kubetoll.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetoll.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetoll.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubetoll.peeringName" -}}
{{- default (include "kubetoll.fullname" .) .Values.operator.peering.name -}}
{{- end -}}

{{- define "kubetoll.webhookName" -}}
{{- printf "%s-webhook" (include "kubetoll.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetoll.webhookTLSSecret" -}}
{{- if .Values.webhook.tls.existingSecret -}}
{{- .Values.webhook.tls.existingSecret -}}
{{- else -}}
{{- printf "%s-webhook-tls" (include "kubetoll.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* A PEM block, or its base64, as base64 (what Secret data and caBundle hold). */}}
{{- define "kubetoll.base64PEM" -}}
{{- if contains "-----BEGIN" . -}}
{{- . | b64enc -}}
{{- else -}}
{{- . | nospace -}}
{{- end -}}
{{- end -}}

{{/*
The webhook configurations' caBundle when it comes from values (webhook.tls),
after checking that the TLS values fit together. Empty with cert-manager (its CA
injector fills it in) and when the chart generates the certificate (webhook.yaml
sets it beside the Secret it generates or finds).
*/}}
{{- define "kubetoll.webhookCABundle" -}}
{{- $tls := .Values.webhook.tls -}}
{{- if and $tls.key (not $tls.cert) -}}
{{- fail "webhook.tls.key needs webhook.tls.cert" -}}
{{- end -}}
{{- if .Values.webhook.certManager.enabled -}}
{{- if or $tls.existingSecret $tls.cert $tls.caBundle -}}
{{- fail "webhook.tls.* and webhook.certManager.enabled exclude each other: cert-manager writes the Secret and the caBundle" -}}
{{- end -}}
{{- else if or $tls.existingSecret $tls.cert -}}
{{- if and $tls.existingSecret $tls.cert -}}
{{- fail "webhook.tls.existingSecret and webhook.tls.cert exclude each other: give the Secret's name or its contents" -}}
{{- end -}}
{{- if and $tls.cert (not $tls.key) -}}
{{- fail "webhook.tls.cert needs webhook.tls.key" -}}
{{- end -}}
{{- include "kubetoll.base64PEM" (required "webhook.tls.caBundle is required with webhook.tls.existingSecret or webhook.tls.cert: the CA (PEM) that signed the serving certificate, for the API server to trust it" $tls.caBundle) -}}
{{- end -}}
{{- end -}}

{{- define "kubetoll.redisName" -}}
{{- printf "%s-redis" (include "kubetoll.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetoll.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}

{{- define "kubetoll.sidecarImage" -}}
{{- printf "%s:%s" .Values.sidecar.image.repository (default .Chart.AppVersion .Values.sidecar.image.tag) -}}
{{- end -}}

{{/* The Redis URL written into every namespace's router config, or nothing. */}}
{{- define "kubetoll.redisURL" -}}
{{- if .Values.redis.deploy -}}
{{- printf "redis://%s.%s.svc.%s:6379/0" (include "kubetoll.redisName" .) .Release.Namespace .Values.clusterDomain -}}
{{- else -}}
{{- .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/* Namespaces the webhook never sees: Kubernetes' own and the operator's. */}}
{{- define "kubetoll.excludedNamespaces" -}}
{{- $ns := list "kube-system" "kube-public" "kube-node-lease" .Release.Namespace -}}
{{- range .Values.webhook.excludeNamespaces -}}
{{- $ns = append $ns . -}}
{{- end -}}
{{- toJson (uniq $ns) -}}
{{- end -}}
