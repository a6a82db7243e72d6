{{/* Common labels. */}}
{{- define "nbd-csi.labels" -}}
app.kubernetes.io/name: nbd-csi
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* The nbd-csi image. */}}
{{- define "nbd-csi.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* A sidecar image from its values entry. */}}
{{- define "nbd-csi.sidecar" -}}
{{ .repository }}:{{ .tag }}
{{- end }}

{{/* The plugin directory on the nodes (the CSI socket lives here). */}}
{{- define "nbd-csi.pluginDir" -}}
{{ .Values.kubeletDir }}/plugins/{{ .Values.driverName }}
{{- end }}
