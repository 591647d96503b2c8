{{/* Names, labels and values derived from other values. */}}

{{- define "sdxl-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release name, plus the chart name when the release name does not already contain it (63-char DNS limit). */}}
{{- define "sdxl-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sdxl-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The server pods; the component label keeps the `helm test` pod out of the Services and the PDB. */}}
{{- define "sdxl-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sdxl-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- define "sdxl-serve.commonLabels" -}}
helm.sh/chart: {{ include "sdxl-serve.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: sdxl-serve
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The `helm test` pod: same name and instance, another component, so no server selector matches it. */}}
{{- define "sdxl-serve.testLabels" -}}
app.kubernetes.io/name: {{ include "sdxl-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
{{- end }}

{{- define "sdxl-serve.labels" -}}
{{ include "sdxl-serve.selectorLabels" . }}
{{ include "sdxl-serve.commonLabels" . }}
{{- end }}

{{- define "sdxl-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sdxl-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image flavour built by docker/Dockerfile for each accelerator (its ACCELERATOR build argument). */}}
{{- define "sdxl-serve.imageFlavour" -}}
{{- get (dict "tpu" "tpu" "gpu" "cuda" "cpu" "cpu") .Values.accelerator.type }}
{{- end }}

{{- define "sdxl-serve.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion (include "sdxl-serve.imageFlavour" .)) .Values.image.tag }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* TPU chips in the slice: the product of the topology's dimensions (1x1 = 1, 2x2 = 4, 2x4 = 8). */}}
{{- define "sdxl-serve.tpuChips" -}}
{{- $chips := 1 }}
{{- range splitList "x" .Values.accelerator.tpu.topology }}
{{- $chips = mul $chips (atoi .) }}
{{- end }}
{{- $chips }}
{{- end }}

{{/* The accelerator's extended resource, requested and limited alike, as a YAML map (empty on CPU). */}}
{{- define "sdxl-serve.acceleratorResource" -}}
{{- if eq .Values.accelerator.type "tpu" }}
google.com/tpu: {{ include "sdxl-serve.tpuChips" . }}
{{- else if eq .Values.accelerator.type "gpu" }}
nvidia.com/gpu: {{ .Values.accelerator.gpu.count }}
{{- end }}
{{- end }}

{{/* Container resources: the accelerator's CPU/memory settings plus its chips in both requests and limits. */}}
{{- define "sdxl-serve.resources" -}}
{{- $base := get .Values.accelerator .Values.accelerator.type }}
{{- $chips := include "sdxl-serve.acceleratorResource" . | fromYaml }}
{{- $requests := merge (deepCopy $chips) (deepCopy ($base.resources.requests | default dict)) }}
{{- $limits := merge (deepCopy $chips) (deepCopy ($base.resources.limits | default dict)) }}
{{- toYaml (dict "requests" $requests "limits" $limits) }}
{{- end }}

{{/* What the server gets as --model. */}}
{{- define "sdxl-serve.modelArgument" -}}
{{- if eq .Values.model.source "hub" }}
{{- .Values.model.hub.id }}
{{- else if has .Values.model.source (list "tiny" "demo") }}
{{- .Values.model.source }}
{{- else }}
{{- .Values.model.mountPath }}
{{- end }}
{{- end }}

{{/* GCS FUSE mount options: the caller's options plus only-dir when a folder is given. */}}
{{- define "sdxl-serve.gcsFuseMountOptions" -}}
{{- $options := list }}
{{- if .mountOptions }}{{ $options = append $options .mountOptions }}{{ end }}
{{- if .path }}{{ $options = append $options (printf "only-dir=%s" (trimAll "/" .path)) }}{{ end }}
{{- join "," $options }}
{{- end }}

{{/*
Rules that span several values (the schema checks each value alone). Rendering fails with a message that
names the value to fix.
*/}}
{{- define "sdxl-serve.validate" -}}
{{- $v := .Values }}
{{- $grace := int $v.terminationGracePeriodSeconds }}
{{- $needed := add $v.server.drainSeconds $v.preStopSleepSeconds }}
{{- if le $grace (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed server.drainSeconds + preStopSleepSeconds (%d): Kubernetes would kill the server while it drains accepted requests" $grace (int $needed)) }}
{{- end }}
{{- if eq $v.model.source "gcsFuse" }}
{{- required "model.gcsFuse.bucket is required when model.source is gcsFuse" $v.model.gcsFuse.bucket | trunc 0 }}
{{- end }}
{{- if eq $v.model.source "pvc" }}
{{- required "model.pvc.claimName is required when model.source is pvc" $v.model.pvc.claimName | trunc 0 }}
{{- end }}
{{- if eq $v.compilationCache.type "gcsFuse" }}
{{- required "compilationCache.gcsFuse.bucket is required when compilationCache.type is gcsFuse" $v.compilationCache.gcsFuse.bucket | trunc 0 }}
{{- end }}
{{- if eq $v.compilationCache.type "pvc" }}
{{- required "compilationCache.pvc.claimName is required when compilationCache.type is pvc" $v.compilationCache.pvc.claimName | trunc 0 }}
{{- end }}
{{- if eq $v.lora.source "gcsFuse" }}
{{- required "lora.gcsFuse.bucket is required when lora.source is gcsFuse" $v.lora.gcsFuse.bucket | trunc 0 }}
{{- end }}
{{- if eq $v.lora.source "pvc" }}
{{- required "lora.pvc.claimName is required when lora.source is pvc" $v.lora.pvc.claimName | trunc 0 }}
{{- end }}
{{- if $v.auth.enabled }}
{{- required "auth.existingSecret is required when auth.enabled is true (the chart never holds the token itself)" $v.auth.existingSecret | trunc 0 }}
{{- end }}
{{- if and $v.autoscaling.enabled (eq $v.metrics.backend "none") }}
{{- fail "autoscaling.enabled needs metrics.backend gmp or prometheus-adapter: the HPA scales on the sdxl_demand or sdxl_load metric" }}
{{- end }}
{{- if and $v.autoscaling.enabled (eq $v.autoscaling.metric "demand") (gt (int $v.autoscaling.headroom.idleSlots) 0) (not $v.monitoring.rules.enabled) }}
{{- fail "autoscaling.headroom.idleSlots needs monitoring.rules.enabled: a recording rule computes the HPA's sdxl_demand_with_headroom (or set idleSlots 0)" }}
{{- end }}
{{- if gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas) }}
{{- fail (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- end }}
{{- if gt (int $v.server.defaultSteps) (int $v.server.maxSteps) }}
{{- fail (printf "server.defaultSteps (%d) must not exceed server.maxSteps (%d)" (int $v.server.defaultSteps) (int $v.server.maxSteps)) }}
{{- end }}
{{- end }}

{{/* Whether the pod mounts any GCS FUSE volume (it then needs the driver's sidecar annotation). */}}
{{- define "sdxl-serve.usesGcsFuse" -}}
{{- if or (eq .Values.model.source "gcsFuse") (eq .Values.compilationCache.type "gcsFuse") (eq .Values.lora.source "gcsFuse") }}true{{ end }}
{{- end }}

{{/* The compilation cache volume source (written by every replica, read on each start). */}}
{{- define "sdxl-serve.compilationCacheVolume" -}}
{{- $cache := .Values.compilationCache }}
{{- if eq $cache.type "gcsFuse" }}
csi:
  driver: gcsfuse.csi.storage.gke.io
  volumeAttributes:
    bucketName: {{ $cache.gcsFuse.bucket }}
    mountOptions: {{ include "sdxl-serve.gcsFuseMountOptions" $cache.gcsFuse | quote }}
{{- else if eq $cache.type "pvc" }}
persistentVolumeClaim:
  claimName: {{ $cache.pvc.claimName }}
{{- else }}
emptyDir:
  sizeLimit: {{ $cache.emptyDir.sizeLimit }}
{{- end }}
{{- end }}
