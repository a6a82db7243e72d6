{{/* Common labels. */}}
{{- define "nbd-csi.labels" -}}
app.kubernetes.io/name: nbd-csi
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/*
An image reference from an image entry and the root context:
  include "nbd-csi.imageRef" (dict "img" .Values.image "root" . "defaultTag" .Chart.AppVersion)
global.imageRegistry replaces the entry's registry; a digest pins the image
(registry/repository:tag@sha256:…, the tag kept for people reading it).
*/}}
{{- define "nbd-csi.imageRef" -}}
{{- $repo := .img.repository -}}
{{- $parts := splitList "/" $repo -}}
{{- $host := first $parts -}}
{{- /* A repository that names its registry (registry.example.com/x/y, as values of earlier chart versions did) keeps it unless global.imageRegistry replaces it. */}}
{{- $qualified := and (gt (len $parts) 1) (or (contains "." $host) (contains ":" $host) (eq $host "localhost")) -}}
{{- $registry := .img.registry -}}
{{- if $qualified }}{{ $registry = "" }}{{ end -}}
{{- with .root.Values.global.imageRegistry }}
{{- $registry = . -}}
{{- if $qualified }}{{ $repo = join "/" (rest $parts) }}{{ end -}}
{{- end -}}
{{- $ref := $repo -}}
{{- if $registry }}{{ $ref = printf "%s/%s" (trimSuffix "/" $registry) $ref }}{{ end -}}
{{- $tag := .img.tag | default .defaultTag -}}
{{- if $tag }}{{ $ref = printf "%s:%s" $ref $tag }}{{ end -}}
{{- if .img.digest }}{{ $ref = printf "%s@%s" $ref .img.digest }}{{ end -}}
{{ $ref }}
{{- end }}

{{/* The nbd-csi image. */}}
{{- define "nbd-csi.image" -}}
{{ include "nbd-csi.imageRef" (dict "img" .Values.image "root" . "defaultTag" .Chart.AppVersion) }}
{{- end }}

{{/* A sidecar image: include "nbd-csi.sidecar" (list . "provisioner"). */}}
{{- define "nbd-csi.sidecar" -}}
{{- $root := index . 0 -}}
{{ include "nbd-csi.imageRef" (dict "img" (index $root.Values.sidecars (index . 1)) "root" $root "defaultTag" "") }}
{{- end }}

{{/* imagePullSecrets of every pod; entries are names or {name: …}. */}}
{{- define "nbd-csi.pullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  {{- if kindIs "string" . }}
  - name: {{ . | quote }}
  {{- else }}
  - name: {{ .name | quote }}
  {{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Controller replicas: 2 with the kubernetes store, else 1. */}}
{{- define "nbd-csi.controllerReplicas" -}}
{{- if hasKey .Values.controller "replicas" -}}
{{ .Values.controller.replicas }}
{{- else if eq .Values.controller.store.type "kubernetes" -}}
2
{{- else -}}
1
{{- end }}
{{- end }}

{{/* The plugin directory on the nodes (the CSI socket lives here). */}}
{{- define "nbd-csi.pluginDir" -}}
{{ .Values.kubeletDir }}/plugins/{{ .Values.driverName }}
{{- end }}
