{{/* Names, labels and the addresses the components use to reach each other. */}}

{{- define "bluemarble.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Kept short: pod names (node ids) are "<fullname>-node-<ordinal>" and DNS labels stop at 63. */}}
{{- /* At most 40 characters, so "<fullname>-controlplane-<hash>-<id>" fits a pod name.
A longer name is cut to 33 and given a hash of the whole: two long names that differ only
after the cut stay apart. */ -}}
{{- define "bluemarble.fullname" -}}
{{- $full := "" -}}
{{- if .Values.fullnameOverride -}}
{{- $full = .Values.fullnameOverride -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- $full = .Release.Name -}}
{{- else -}}
{{- $full = printf "%s-%s" .Release.Name $name -}}
{{- end -}}
{{- end -}}
{{- if not (regexMatch "^[a-z]" $full) -}}
{{- fail (printf "the release's full name %q must start with a lower-case letter (Service names are DNS-1035 labels): rename the release or set fullnameOverride" $full) -}}
{{- end -}}
{{- if gt (len $full) 40 -}}
{{- printf "%s-%s" ($full | trunc 33 | trimSuffix "-") ($full | sha256sum | trunc 6) -}}
{{- else -}}
{{- $full | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- /* A PromQL selector of this release's pods: its namespace, and its control-plane and
node pod names (the namespace alone would mix releases that share one). */ -}}
{{- define "bluemarble.podSelector" -}}
{{- $full := include "bluemarble.fullname" . | regexQuoteMeta -}}
{{- printf "namespace=%q, pod=~%q" .Release.Namespace (printf "%s-(controlplane-.+|node-[0-9]+)" $full) -}}
{{- end -}}

{{- define "bluemarble.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "bluemarble.labels" -}}
helm.sh/chart: {{ include "bluemarble.chart" . }}
app.kubernetes.io/name: {{ include "bluemarble.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "controlplane"). */}}
{{- define "bluemarble.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bluemarble.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of a component's pod template: the selector's, and the app version on our own
images (it changes with the image anyway); not helm.sh/chart: a chart bump alone (an alert
threshold) would otherwise restart every pod, etcd's and the nodes' with their drains. Call
with (dict "ctx" $ "component" "nodes" "version" true). */}}
{{- define "bluemarble.podTemplateLabels" -}}
{{ include "bluemarble.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- if .version }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
{{- end }}
{{- end -}}

{{- define "bluemarble.componentLabels" -}}
{{ include "bluemarble.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* A component's podLabels, refused when they would set a label the chart sets (a
duplicate key; the selector's labels among them): call with (dict "labels" ... "where"
"nodes"). Label keys and values are checked by values.schema.json. */}}
{{- define "bluemarble.podLabels" -}}
{{- $reserved := list "helm.sh/chart" "app.kubernetes.io/name" "app.kubernetes.io/instance" "app.kubernetes.io/version" "app.kubernetes.io/managed-by" "app.kubernetes.io/component" -}}
{{- range $key, $_ := .labels -}}
{{- if has $key $reserved -}}
{{- fail (printf "%s.podLabels may not set %s: the chart sets it (the Services and disruption budgets select the pods by these labels)" $.where $key) -}}
{{- end -}}
{{- end -}}
{{- with .labels }}{{ toYaml . }}{{ end -}}
{{- end -}}

{{- define "bluemarble.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "bluemarble.controlplane.fullname" -}}{{ include "bluemarble.fullname" . }}-controlplane{{- end -}}
{{- define "bluemarble.node.fullname" -}}{{ include "bluemarble.fullname" . }}-node{{- end -}}
{{- define "bluemarble.etcd.fullname" -}}{{ include "bluemarble.fullname" . }}-etcd{{- end -}}
{{- define "bluemarble.etcd.headless" -}}{{ include "bluemarble.fullname" . }}-etcd-headless{{- end -}}

{{/* The control plane's address for nodes and clients: its Service, by its namespaced name. */}}
{{- define "bluemarble.controlplane.address" -}}
{{- printf "%s.%s.svc:%d" (include "bluemarble.controlplane.fullname" .) .Release.Namespace (int .Values.controlplane.grpcPort) -}}
{{- end -}}

{{/* etcd endpoints (host:port, comma-separated): the chart's etcd through its client
Service (one DNS name: the control plane dials it through gRPC's DNS resolver, and a member
that goes away costs a reconnect to another), or the external endpoints. */}}
{{- define "bluemarble.etcd.endpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- printf "%s.%s.svc:2379" (include "bluemarble.etcd.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- if not .Values.etcd.endpoints -}}
{{- fail "etcd.enabled=false needs etcd.endpoints (host:port list of the external etcd)" -}}
{{- end -}}
{{- join "," .Values.etcd.endpoints -}}
{{- end -}}
{{- end -}}

{{/* Env of the processes that talk to etcd (the control plane, the etcd backup): the
endpoints, the cluster name, and for an external etcd its TLS files and user. */}}
{{- define "bluemarble.etcdEnv" -}}
- name: BLUEMARBLE_ETCD
  value: {{ include "bluemarble.etcd.endpoints" . | quote }}
- name: BLUEMARBLE_CLUSTER
  value: {{ .Values.clusterName | quote }}
{{- if and (not .Values.etcd.enabled) .Values.etcd.tls.enabled }}
- name: BLUEMARBLE_ETCD_CA
  value: /etc/bluemarble/etcd-tls/{{ .Values.etcd.tls.caKey }}
{{- if .Values.etcd.tls.certKey }}
- name: BLUEMARBLE_ETCD_CERT
  value: /etc/bluemarble/etcd-tls/{{ .Values.etcd.tls.certKey }}
- name: BLUEMARBLE_ETCD_KEY
  value: /etc/bluemarble/etcd-tls/{{ .Values.etcd.tls.keyKey }}
{{- end }}
{{- with .Values.etcd.tls.serverName }}
- name: BLUEMARBLE_ETCD_SERVER_NAME
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- if and (not .Values.etcd.enabled) .Values.etcd.auth.username }}
- name: BLUEMARBLE_ETCD_USER
  value: {{ .Values.etcd.auth.username | quote }}
- name: BLUEMARBLE_ETCD_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ required "etcd.auth.username needs etcd.auth.passwordSecret" .Values.etcd.auth.passwordSecret }}
      key: {{ .Values.etcd.auth.passwordKey }}
{{- end }}
{{- end -}}

{{- define "bluemarble.tls.nodeSecret" -}}
{{- default .Values.tls.secretName .Values.tls.nodeSecretName -}}
{{- end -}}

{{/* Env of both processes: logging, metrics, tracing, TLS files. */}}
{{- define "bluemarble.commonEnv" -}}
{{- $ := .ctx -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: BLUEMARBLE_METRICS_LISTEN
  value: {{ printf "0.0.0.0:%d" (int .metricsPort) | quote }}
- name: BLUEMARBLE_LOG_LEVEL
  value: {{ $.Values.logLevel | quote }}
- name: BLUEMARBLE_LOG_FORMAT
  value: {{ $.Values.logFormat | quote }}
{{- if $.Values.tls.enabled }}
- name: BLUEMARBLE_TLS_CERT
  value: /etc/bluemarble/tls/{{ $.Values.tls.certKey }}
- name: BLUEMARBLE_TLS_KEY
  value: /etc/bluemarble/tls/{{ $.Values.tls.keyKey }}
- name: BLUEMARBLE_TLS_CA
  value: /etc/bluemarble/tls/{{ $.Values.tls.caKey }}
{{- end }}
{{- if $.Values.tracing.otlpEndpoint }}
- name: OTEL_TRACES_EXPORTER
  value: otlp
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $.Values.tracing.otlpEndpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "bluemarble-%s" .component | quote }}
{{- end }}
{{- end -}}

{{/* Probes: native gRPC probes against grpc.health.v1 (service "", the process) in plaintext;
with TLS the kubelet's gRPC probe cannot connect (it speaks plaintext only), so an exec probe
runs the chart's health check with the pod's own certificate. Call with
(dict "ctx" $ "port" 7000 "probes" .Values.x.probes "serverName" "...") */}}
{{- define "bluemarble.probes" -}}
{{- /* Startup and liveness check the process (health service ""); readiness checks
.readyService ("" for the process too), e.g. a node's ShardNode service, SERVING only once
the node is registered and its copies are caught up. */ -}}
{{- $p := .probes -}}
{{- $ready := .readyService | default "" -}}
{{- $live := dict -}}
{{- $readyCheck := dict -}}
{{- if .ctx.Values.tls.enabled -}}
{{- $script := "/etc/bluemarble/scripts/health_probe.py" -}}
{{- $target := printf "127.0.0.1:%d" (int .port) -}}
{{- $live = dict "exec" (dict "command" (list "python3" $script $target .serverName)) -}}
{{- $readyCheck = dict "exec" (dict "command" (list "python3" $script $target .serverName $ready)) -}}
{{- else -}}
{{- $live = dict "grpc" (dict "port" (int .port) "service" "") -}}
{{- $readyCheck = dict "grpc" (dict "port" (int .port) "service" $ready) -}}
{{- end -}}
startupProbe:
  {{- toYaml $live | nindent 2 }}
  periodSeconds: 2
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.startupFailureThreshold }}
livenessProbe:
  {{- toYaml $live | nindent 2 }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.livenessFailureThreshold }}
readinessProbe:
  {{- toYaml $readyCheck | nindent 2 }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.readinessFailureThreshold }}
{{- end -}}

{{/* Topology spread over zones and hosts for one component. */}}
{{- define "bluemarble.topologySpread" -}}
{{- $spread := .spread -}}
{{- if $spread.enabled -}}
topologySpreadConstraints:
  - maxSkew: {{ $spread.maxSkew }}
    topologyKey: {{ $spread.zoneKey }}
    whenUnsatisfiable: {{ $spread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "bluemarble.selectorLabels" . | nindent 8 }}
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "bluemarble.selectorLabels" . | nindent 8 }}
{{- end }}
{{- end -}}

{{- /* A hash of the scripts' own text (not of the rendered ConfigMap, whose labels carry the
chart version: a chart bump would restart every pod). */ -}}
{{- define "bluemarble.scriptsChecksum" -}}
{{- print (.Files.Get "files/topology.py") (.Files.Get "files/health_probe.py") | sha256sum -}}
{{- end -}}
