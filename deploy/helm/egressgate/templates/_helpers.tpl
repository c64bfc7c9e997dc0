{{/* Chart name, truncated to a DNS label. */}}
{{- define "egressgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full object name prefix. */}}
{{- define "egressgate.fullname" -}}
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

{{- define "egressgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "egressgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "egressgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "egressgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: egressgate
{{- end }}

{{- define "egressgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "egressgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "egressgate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "egressgate.configMapName" -}}
{{- default (printf "%s-config" (include "egressgate.fullname" .)) .Values.config.existingConfigMap }}
{{- end }}

{{- define "egressgate.policiesConfigMapName" -}}
{{- default (printf "%s-policies" (include "egressgate.fullname" .)) .Values.policies.existingConfigMap }}
{{- end }}

{{/* The admin port: the digits after the last colon of listen.admin. */}}
{{- define "egressgate.adminPort" -}}
{{- regexFind "[0-9]+$" .Values.listen.admin }}
{{- end }}

{{/* True (non-empty) when prometheus-operator objects may be rendered. */}}
{{- define "egressgate.monitoringApi" -}}
{{- if or .Values.monitoringApi.assumeAvailable (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}true{{ end }}
{{- end }}

{{/*
The gateway's config.yaml. Built as a dict so every key is the one gateway/src/config.rs reads;
numbers go through int64 because Helm holds values as float64, and Helm 3's toYaml prints 1000000
as 1e+06, which the gateway rejects.
*/}}
{{- define "egressgate.config" -}}
{{- $v := .Values }}
{{- $listen := dict "tproxy" $v.listen.tproxy "clientFirstTproxy" $v.listen.clientFirstTproxy "dns" $v.listen.dns "admin" $v.listen.admin }}
{{- if $v.listen.workers }}
{{- $_ := set $listen "workers" (int64 $v.listen.workers) }}
{{- end }}
{{- $config := dict
  "listen" $listen
  "policyDir" "/etc/egressgate/policies"
  "identity" (dict "kubernetes" (dict))
  "intercept" (dict
    "podCidrs" $v.intercept.podCidrs
    "interfaces" $v.intercept.interfaces
    "bypassCidrs" $v.intercept.bypassCidrs
    "blockQuic" $v.intercept.blockQuic
    "excludePods" $v.intercept.excludePods
    "clientFirstPorts" $v.intercept.clientFirstPorts)
  "nftables" (dict
    "manage" $v.nftables.manage
    "table" $v.nftables.table
    "mark" (int64 $v.nftables.mark)
    "routeTable" (int64 $v.nftables.routeTable))
  "dns" (dict
    "upstreams" $v.dns.upstreams
    "foreignServers" $v.dns.foreignServers
    "upstreamTimeoutMs" (int64 $v.dns.upstreamTimeoutMs)
    "minTtlSeconds" (int64 $v.dns.minTtlSeconds)
    "idleGraceSeconds" (int64 $v.dns.idleGraceSeconds)
    "maxNamesPerPod" (int64 $v.dns.maxNamesPerPod)
    "maxNames" (int64 $v.dns.maxNames))
  "peek" (dict
    "timeoutMs" (int64 $v.peek.timeoutMs)
    "maxBytes" (int64 $v.peek.maxBytes)
    "requireSni" $v.peek.requireSni
    "maxPending" (int64 $v.peek.maxPending)
    "maxPendingPerPod" (int64 $v.peek.maxPendingPerPod))
  "connections" (dict
    "idleTimeoutSeconds" (int64 $v.connections.idleTimeoutSeconds)
    "max" (int64 $v.connections.max)
    "shutdownGraceSeconds" (int64 $v.connections.shutdownGraceSeconds))
  "udp" (dict
    "listen" $v.udp.listen
    "flowIdleSeconds" (int64 $v.udp.flowIdleSeconds)
    "deniedFlowSeconds" (int64 $v.udp.deniedFlowSeconds)
    "maxFlows" (int64 $v.udp.maxFlows)
    "flowMark" (int64 $v.udp.flowMark))
  "observe" (dict
    "history" (int64 $v.observe.history)
    "maxSubscribers" (int64 $v.observe.maxSubscribers)
    "queueLines" (int64 $v.observe.queueLines))
  "unselectedPods" $v.unselectedPods
  "state" (dict
    "dir" "/var/lib/egressgate"
    "snapshotIntervalSeconds" (int64 $v.stateDir.snapshotIntervalSeconds)
    "afterHandover" "wait"
    "successorWaitSeconds" (int64 $v.stateDir.successorWaitSeconds))
}}
{{- if and $v.nftables.manage $v.nftables.removeOnUninstall }}
{{- $_ := set $config.nftables "ownerDaemonSet" (dict "namespace" .Release.Namespace "name" (include "egressgate.fullname" .)) }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/*
The alert rule groups, shared by the PrometheusRule and deploy/prometheus/egressgate-alerts.yaml
(generated from the defaults by `scripts/check-deploy --sync`). `{{ "{{ … }}" }}` passes
Prometheus template syntax through Helm.
*/}}
{{- define "egressgate.alertGroups" -}}
{{- $job := printf "job=%q" (include "egressgate.name" .) }}
{{- $a := .Values.prometheusRule.alerts }}
{{- $extra := .Values.prometheusRule.ruleLabels }}
- name: egressgate
  rules:
  {{- with $a.gatewayDown }}
  {{- if .enabled }}
    - alert: EgressgateDown
      expr: up{ {{- $job -}} } == 0
      for: {{ .for }}
      labels:
        {{- toYaml (merge (dict "severity" .severity) $extra) | nindent 8 }}
      annotations:
        summary: egressgate on {{ "{{ $labels.node }}" }} ({{ "{{ $labels.instance }}" }}) is down
        description: >-
          Prometheus has not scraped the gateway on {{ "{{ $labels.node }}" }} ({{ "{{ $labels.instance }}" }})
          for {{ .for }}. While it is down, intercepted pod connections on that node are refused.
  {{- end }}
  {{- end }}
  {{- with $a.targetsMissing }}
  {{- if .enabled }}
    - alert: EgressgateTargetsMissing
      expr: absent(up{ {{- $job -}} })
      for: {{ .for }}
      labels:
        {{- toYaml (merge (dict "severity" .severity) $extra) | nindent 8 }}
      annotations:
        summary: No egressgate gateway is scraped
        description: >-
          Prometheus has had no {{ $job }} target for {{ .for }}: check the DaemonSet, the metrics
          Service and the ServiceMonitor.
  {{- end }}
  {{- end }}
  {{- with $a.policyStale }}
  {{- if .enabled }}
    - alert: EgressgatePolicyStale
      expr: egressgate_policy_stale{ {{- $job -}} } == 1
      for: {{ .for }}
      labels:
        {{- toYaml (merge (dict "severity" .severity) $extra) | nindent 8 }}
      annotations:
        summary: egressgate on {{ "{{ $labels.node }}" }} enforces a stale policy set
        description: >-
          The policy files on {{ "{{ $labels.node }}" }} ({{ "{{ $labels.instance }}" }}) failed to load; the gateway
          still enforces the last good set. Its log names the file and line of the error.
  {{- end }}
  {{- end }}
  {{- with $a.denySpike }}
  {{- if .enabled }}
    # Denied connections per second by pod namespace, all nodes, over 5 minutes and over an hour;
    # what a client gave up on (client_closed) is not a policy signal.
    - record: namespace:egressgate_connections_denied:rate5m
      expr: sum by (namespace) (rate(egressgate_connections_total{ {{- $job -}} ,verdict="deny",reason!="client_closed"}[5m]))
    - record: namespace:egressgate_connections_denied:rate1h
      expr: sum by (namespace) (rate(egressgate_connections_total{ {{- $job -}} ,verdict="deny",reason!="client_closed"}[1h]))
    # Above minRate, and above factor times the rate over the hour before (time before a
    # namespace's first denial counts as none).
    - alert: EgressgateDenySpike
      expr: |-
        namespace:egressgate_connections_denied:rate5m > {{ .minRate }}
        and
        namespace:egressgate_connections_denied:rate5m
          > {{ .factor }} * (
              namespace:egressgate_connections_denied:rate1h offset 5m
            or
              namespace:egressgate_connections_denied:rate5m * 0
          )
      for: {{ .for }}
      labels:
        {{- toYaml (merge (dict "severity" .severity) $extra) | nindent 8 }}
      annotations:
        summary: Denied connections from namespace {{ "{{ $labels.namespace }}" }} spiked
        description: >-
          Pods in {{ "{{ $labels.namespace }}" }} had {{ "{{ $value | humanize }}" }} denied connections per second over
          5 minutes, more than {{ .factor }} times the hour before. The gateway logs (event
          "decision", verdict "deny") and egressgate_denied_connections_total name the destinations.
  {{- end }}
  {{- end }}
  {{- with $a.dnsUpstreamErrors }}
  {{- if .enabled }}
    - alert: EgressgateDnsUpstreamErrors
      expr: |-
        sum by (node, instance) (rate(egressgate_dns_upstream_errors_total{ {{- $job -}} }[5m]))
          / sum by (node, instance) (rate(egressgate_dns_queries_total{ {{- $job -}} }[5m]))
          > {{ .ratio }}
      for: {{ .for }}
      labels:
        {{- toYaml (merge (dict "severity" .severity) $extra) | nindent 8 }}
      annotations:
        summary: egressgate on {{ "{{ $labels.node }}" }} has DNS upstream errors
        description: >-
          {{ "{{ $value | humanizePercentage }}" }} of the DNS queries intercepted on {{ "{{ $labels.node }}" }}
          ({{ "{{ $labels.instance }}" }}) met a failed exchange with a trusted upstream (timeouts, I/O
          errors, mismatched answers); pods see SERVFAIL when every upstream fails.
  {{- end }}
  {{- end }}
  {{- with $a.identityWatchFailing }}
  {{- if .enabled }}
    # A watch that fails and has delivered nothing for 10 minutes: the gateway decides with
    # an index that no longer follows the cluster (new pods are unknown sources).
    - alert: EgressgateIdentityWatchFailing
      expr: |-
        sum by (job, instance, node, resource) (increase(egressgate_identity_watch_errors_total{ {{- $job -}} }[10m])) > 0
        and on (job, instance, node, resource)
        (time() - max by (job, instance, node, resource) (egressgate_identity_watch_last_event_timestamp_seconds{ {{- $job -}} }) > 600)
      for: {{ .for }}
      labels:
        {{- toYaml (merge (dict "severity" .severity) $extra) | nindent 8 }}
      annotations:
        summary: egressgate on {{ "{{ $labels.node }}" }} cannot watch {{ "{{ $labels.resource }}" }}
        description: >-
          The gateway on {{ "{{ $labels.node }}" }} ({{ "{{ $labels.instance }}" }}) has failed to list or watch
          {{ "{{ $labels.resource }}" }} for 10 minutes without an event. It keeps deciding with its last index:
          new pods are unknown sources and label changes are not seen. Its identity_watch log lines and
          egressgate_identity_watch_errors_total (by kind) say why.
  {{- end }}
  {{- end }}
  {{- with $a.stateNotSaved }}
  {{- if .enabled }}
    # Writes of the name journal or snapshot fail, or no snapshot was written for 10 minutes
    # (the default interval is one minute): a restart of that gateway would forget names.
    - alert: EgressgateStateNotSaved
      expr: |-
        increase(egressgate_state_write_errors_total{ {{- $job -}} }[10m]) > 0
        or
        egressgate_state_journal_age_seconds{ {{- $job -}} } > 600
      for: {{ .for }}
      labels:
        {{- toYaml (merge (dict "severity" .severity) $extra) | nindent 8 }}
      annotations:
        summary: egressgate on {{ "{{ $labels.node }}" }} cannot save its name table
        description: >-
          The gateway on {{ "{{ $labels.node }}" }} ({{ "{{ $labels.instance }}" }}) fails to write its name journal or
          snapshot to its state directory (full or read-only disk?). It keeps working, but a restart
          would forget the names pods resolved: connections of pods that cache DNS answers would
          be denied (no_dns_record) until they resolve again. See docs/operations.md.
  {{- end }}
  {{- end }}
{{- end }}
