{{/* Labels every object of the chart carries, besides the ones that identify it. */}}
{{- define "virtnet.metaLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: virtnet
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels of objects that belong to no single component (RBAC, ServiceAccounts). */}}
{{- define "virtnet.labels" -}}
{{ include "virtnet.metaLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of one component; call with (dict "component" "controller" "context" $). */}}
{{- define "virtnet.selectorLabels" -}}
app.kubernetes.io/name: virtnet-{{ .component }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
{{- end }}

{{/* All labels of one component's objects; same arguments as virtnet.selectorLabels. */}}
{{- define "virtnet.componentLabels" -}}
{{ include "virtnet.metaLabels" .context }}
{{ include "virtnet.selectorLabels" . }}
{{- end }}

{{- define "virtnet.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Environment shared by the controller and the agent. */}}
{{- define "virtnet.commonEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: VIRTNET_LOG_LEVEL
  value: {{ .Values.log.level | quote }}
- name: VIRTNET_LOG_FORMAT
  value: {{ .Values.log.format | quote }}
- name: VIRTNET_FIXED_IP_STATEFULSET
  value: {{ .Values.fixedIPRetention.statefulSet | quote }}
- name: VIRTNET_FIXED_IP_KUBEVIRT
  value: {{ .Values.fixedIPRetention.kubevirt | quote }}
{{- end }}

{{/* Liveness and readiness probes on the component's HTTP port (named "http"). */}}
{{- define "virtnet.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: http
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /readyz
    port: http
  periodSeconds: 5
{{- end }}
