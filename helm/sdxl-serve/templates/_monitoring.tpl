{{- /*
The recording and alerting rules over the sdxl_* metrics, as Prometheus rule groups: one definition
rendered into a PrometheusRule (prometheus-operator) or a GMP Rules object (Google Managed Prometheus),
and checked with `promtool check rules` / `promtool test rules` by tests/monitoring/.

Series are this release's: `job` is the scrape object's name (PodMonitoring or ServiceMonitor Service,
both the full name) and `namespace` the release namespace. Errors are the statuses the server is to blame
for, or that turned a caller away: everything but OK and the caller's own mistakes (INVALID_ARGUMENT,
UNAUTHENTICATED, CANCELLED, NOT_FOUND). Latency is that of generation requests (both doors), not of
GetServerInfo / ListModels.
*/ -}}
{{- define "sdxl-serve.metricSelector" -}}
job="{{ include "sdxl-serve.fullname" . }}", namespace="{{ .Release.Namespace }}"
{{- end }}

{{- define "sdxl-serve.ruleGroups" -}}
{{- $sel := include "sdxl-serve.metricSelector" . -}}
{{- $rules := .Values.monitoring.rules -}}
{{- $hpa := include "sdxl-serve.fullname" . -}}
- name: sdxl-serve.recording
  interval: {{ $rules.interval }}
  rules:
    - record: sdxl:requests:rate5m
      expr: sum by (namespace, job, code) (rate(sdxl_requests_total{ {{- $sel -}} }[5m]))
    - record: sdxl:request_errors:ratio_rate5m
      # No error series at all is a ratio of 0, not no data.
      expr: |-
        (
          sum by (namespace, job) (rate(sdxl_requests_total{ {{- $sel }}, code!~"OK|INVALID_ARGUMENT|UNAUTHENTICATED|CANCELLED|NOT_FOUND"}[5m]))
          or
          0 * sum by (namespace, job) (rate(sdxl_requests_total{ {{- $sel -}} }[5m]))
        )
        /
        sum by (namespace, job) (rate(sdxl_requests_total{ {{- $sel -}} }[5m]))
    - record: sdxl:request_duration_seconds:p99_5m
      expr: histogram_quantile(0.99, sum by (namespace, job, le) (rate(sdxl_request_duration_seconds_bucket{ {{- $sel }}, method=~"Generate|GenerateStream|CreateImage"}[5m])))
    - record: sdxl:request_duration_seconds:p50_5m
      expr: histogram_quantile(0.5, sum by (namespace, job, le) (rate(sdxl_request_duration_seconds_bucket{ {{- $sel }}, method=~"Generate|GenerateStream|CreateImage"}[5m])))
    - record: sdxl:load:avg
      expr: avg by (namespace, job) (sdxl_load{ {{- $sel -}} })
    - record: sdxl:demand:sum
      expr: sum by (namespace, job) (sdxl_demand{ {{- $sel -}} })
    - record: sdxl:queue_depth:sum
      expr: sum by (namespace, job) (sdxl_queue_depth{ {{- $sel -}} })
{{- $a := .Values.autoscaling }}
{{- if and $a.enabled (eq $a.metric "demand") (gt (float64 $a.headroom.idleSlots) 0.0) }}
# What the HPA reads with autoscaling.headroom.idleSlots: ceil(this / targetDemand) replicas =
# ceil(max(demand / target, demand + idle slots / slots per pod)). Evaluated as often as the pods are
# scraped, so it lags the pods' own demand by at most one interval. No series while no pod serves (the HPA
# then keeps its replicas). Slots per pod average only pods that have slots: a warming pod reports 0, which
# would shrink the average and so grow the idle pods, and with them the warming pods.
- name: sdxl-serve.autoscaling
  interval: {{ .Values.metrics.interval }}
  rules:
    - record: sdxl_demand_with_headroom
      expr: |-
        (
          sum by (namespace, job) (sdxl_demand{ {{- $sel -}} })
          >=
          {{ $a.targetDemand }} * (sum by (namespace, job) (sdxl_demand{ {{- $sel -}} }) + {{ $a.headroom.idleSlots }} / avg by (namespace, job) (sdxl_slots_total{ {{- $sel -}} } > 0))
        )
        or
        {{ $a.targetDemand }} * (sum by (namespace, job) (sdxl_demand{ {{- $sel -}} }) + {{ $a.headroom.idleSlots }} / avg by (namespace, job) (sdxl_slots_total{ {{- $sel -}} } > 0))
{{- end }}
- name: sdxl-serve.alerts
  interval: {{ $rules.interval }}
  rules:
    - alert: SdxlReplicaNotReady
      # Longer than a cold start (the model load plus a compile per resolution); drains last seconds.
      expr: sdxl_ready{ {{- $sel -}} } == 0
      for: {{ $rules.notReadyFor }}
      labels:
        severity: warning
      annotations:
        summary: "sdxl-serve replica {{ "{{" }} $labels.instance {{ "}}" }} has not been ready for {{ $rules.notReadyFor }}"
        description: "sdxl_ready is 0: warm-up (model load, compile) has not finished, or the engine failed. Check the pod's log for the 'ready' or 'failed' event."
    - alert: SdxlNoReplicaReady
      # No ready replica at all, or none scraped (absent): every request is refused.
      expr: (sum by (namespace, job) (sdxl_ready{ {{- $sel -}} }) == 0) or absent(sdxl_ready{ {{- $sel -}} })
      for: {{ $rules.noneReadyFor }}
      labels:
        severity: critical
      annotations:
        summary: "no sdxl-serve replica of {{ $hpa }} is ready"
        description: "No scraped replica reports sdxl_ready = 1 for {{ $rules.noneReadyFor }}: both front doors answer UNAVAILABLE (gRPC) / 503 (HTTP), or nothing answers."
    - alert: SdxlHighErrorRatio
      expr: sdxl:request_errors:ratio_rate5m{ {{- $sel -}} } > {{ $rules.errorRatio }}
      for: {{ $rules.errorRatioFor }}
      labels:
        severity: warning
      annotations:
        summary: "{{ "{{" }} $value | humanizePercentage {{ "}}" }} of sdxl-serve requests fail"
        description: "More than {{ $rules.errorRatio }} of requests ended in a server-side or overload status for {{ $rules.errorRatioFor }}; sdxl:requests:rate5m shows which codes."
    - alert: SdxlQueueSaturated
      # The admission queue (server.maxQueue images) stays nearly full: callers are being turned away
      # (RESOURCE_EXHAUSTED / 429) or wait long; the HPA should be adding replicas.
      expr: sdxl_queue_depth{ {{- $sel -}} } >= {{ ceil (mulf .Values.server.maxQueue $rules.queueSaturatedRatio) }}
      for: {{ $rules.queueSaturatedFor }}
      labels:
        severity: warning
      annotations:
        summary: "sdxl-serve queue on {{ "{{" }} $labels.instance {{ "}}" }} is {{ "{{" }} $value {{ "}}" }} of {{ .Values.server.maxQueue }} images"
        description: "The admission queue has held at least {{ $rules.queueSaturatedRatio }} of server.maxQueue for {{ $rules.queueSaturatedFor }}."
    - alert: SdxlLatencyP99OverSLO
      expr: sdxl:request_duration_seconds:p99_5m{ {{- $sel -}} } > {{ $rules.latencyP99Seconds }}
      for: {{ $rules.latencyFor }}
      labels:
        severity: warning
      annotations:
        summary: "sdxl-serve p99 latency is {{ "{{" }} $value | humanizeDuration {{ "}}" }} (SLO {{ $rules.latencyP99Seconds }}s)"
        description: "The 99th percentile of generation requests has been above {{ $rules.latencyP99Seconds }}s for {{ $rules.latencyFor }}."
    {{- if .Values.autoscaling.enabled }}
    - alert: SdxlAutoscalerAtMaxReplicas
      # kube-state-metrics' HPA series: the HPA cannot add replicas while the load stays above target.
      expr: |-
        (
          kube_horizontalpodautoscaler_status_current_replicas{namespace="{{ .Release.Namespace }}", horizontalpodautoscaler="{{ $hpa }}"}
          >= on (namespace, horizontalpodautoscaler)
          kube_horizontalpodautoscaler_spec_max_replicas{namespace="{{ .Release.Namespace }}", horizontalpodautoscaler="{{ $hpa }}"}
        )
        and on (namespace)
        (sdxl:load:avg{ {{- $sel -}} } > {{ .Values.autoscaling.targetLoad }})
      for: {{ $rules.atMaxReplicasFor }}
      labels:
        severity: warning
      annotations:
        summary: "sdxl-serve HPA {{ $hpa }} is at its {{ .Values.autoscaling.maxReplicas }} replicas and the load stays above {{ .Values.autoscaling.targetLoad }}"
        description: "Raise autoscaling.maxReplicas (and the TPU quota), or expect queueing and RESOURCE_EXHAUSTED / 429."
    {{- end }}
{{- end }}
