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
{{- printf "%s-webhook-tls" (include "kubetoll.fullname" .) | trunc 63 | trimSuffix "-" -}}
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
