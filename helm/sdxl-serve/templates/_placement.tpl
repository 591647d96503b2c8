{{- /*
Where a server pod may run: its accelerator's node selectors and toleration plus the chart's extra ones, as
pod spec fields. The server Deployment and the headroom placeholder pods (templates/headroom.yaml) share it,
so that a placeholder holds exactly the kind of node a new server pod needs.
*/ -}}
{{- define "sdxl-serve.podPlacement" -}}
{{- $accelerator := .Values.accelerator.type }}
{{- $nodeSelector := deepCopy .Values.nodeSelector }}
{{- if eq $accelerator "tpu" }}
{{- $_ := set $nodeSelector "cloud.google.com/gke-tpu-accelerator" .Values.accelerator.tpu.accelerator }}
{{- $_ := set $nodeSelector "cloud.google.com/gke-tpu-topology" .Values.accelerator.tpu.topology }}
{{- else if eq $accelerator "gpu" }}
{{- $_ := set $nodeSelector "cloud.google.com/gke-accelerator" .Values.accelerator.gpu.accelerator }}
{{- end }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if or (ne $accelerator "cpu") .Values.tolerations }}
tolerations:
  {{- if eq $accelerator "tpu" }}
  - key: google.com/tpu
    operator: Exists
    effect: NoSchedule
  {{- else if eq $accelerator "gpu" }}
  - key: nvidia.com/gpu
    operator: Exists
    effect: NoSchedule
  {{- end }}
  {{- with .Values.tolerations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
