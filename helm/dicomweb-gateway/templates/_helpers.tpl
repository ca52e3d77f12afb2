{{- define "dicomweb-gateway.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dicomweb-gateway.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "dicomweb-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dicomweb-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dicomweb-gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "dicomweb-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "dicomweb-gateway.secretName" -}}
{{- .Values.cluster.existingSecret | default (printf "%s-cluster" (include "dicomweb-gateway.fullname" .)) }}
{{- end }}

{{/* The config the pods read: .Values.config, with cache.url defaulting to redis.url. */}}
{{- define "dicomweb-gateway.config" -}}
{{- $config := deepCopy .Values.config }}
{{- if and .Values.redis.url (not (dig "cache" "url" "" $config)) }}
{{- $_ := set $config "cache" (merge (dict "url" .Values.redis.url) (get $config "cache" | default dict)) }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* "true" when the replicas share Redis: cache.url in the config, or GATEWAY_CACHE__URL in extraEnv. */}}
{{- define "dicomweb-gateway.hasRedis" -}}
{{- $config := include "dicomweb-gateway.config" . | fromYaml }}
{{- $found := not (empty (dig "cache" "url" "" $config)) }}
{{- range .Values.extraEnv }}
{{- if eq .name "GATEWAY_CACHE__URL" }}{{ $found = true }}{{ end }}
{{- end }}
{{- if $found }}true{{ end }}
{{- end }}

{{/* Checks that would otherwise only show as a crash-looping pod. */}}
{{- define "dicomweb-gateway.validate" -}}
{{- $config := include "dicomweb-gateway.config" . | fromYaml }}
{{- if not $config.nodes }}
{{- fail "config.nodes: at least one PACS node is required (name, ae_title, host, port)" }}
{{- end }}
{{- if and (eq (dig "auth" "mode" "none" $config) "none") (not .Values.allowUnauthenticated) }}
{{- fail "config.auth.mode is none: the gateway refuses to serve the pod network without authentication. Set allowUnauthenticated=true only behind an authenticating proxy." }}
{{- end }}
{{- $move := false }}
{{- range $config.nodes }}
{{- if eq (.retrieve | default "get") "move" }}{{ $move = true }}{{ end }}
{{- end }}
{{- if and $move (gt (int .Values.replicaCount) 1) (not (and (include "dicomweb-gateway.hasRedis" .) (dig "cluster" "internal_port" "" $config))) }}
{{- fail "C-MOVE with more than one replica needs redis.url and config.cluster.internal_port: an instance may arrive at any replica, which hands it to the one that asked through Redis and the internal endpoint" }}
{{- end }}
{{- end }}

{{/* Size of the spool emptyDir: spool.sizeLimit, else config.spool.max_bytes + 25 %, in Mi. */}}
{{- define "dicomweb-gateway.spoolSizeLimit" -}}
{{- if .Values.spool.sizeLimit }}
{{- .Values.spool.sizeLimit }}
{{- else }}
{{- $raw := .Values.config.spool.max_bytes | default "10GiB" }}
{{- $bytes := 0.0 }}
{{- if kindIs "string" $raw }}
{{- $s := $raw | trim | upper }}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?\\s*([KMGT]I?B|B)?$" $s) }}
{{- fail (printf "config.spool.max_bytes: expected a size such as 10GiB, got %q" $raw) }}
{{- end }}
{{- $units := dict "" 1 "B" 1 "KIB" 1024 "MIB" 1048576 "GIB" 1073741824 "TIB" 1099511627776 "KB" 1000 "MB" 1000000 "GB" 1000000000 "TB" 1000000000000 }}
{{- $unit := regexReplaceAll "^[0-9.]+\\s*" $s "" }}
{{- $bytes = mulf (regexFind "^[0-9.]+" $s | float64) (get $units $unit) }}
{{- else }}
{{- $bytes = float64 $raw }}
{{- end }}
{{- printf "%dMi" (int64 (ceil (divf (mulf $bytes 1.25) 1048576))) }}
{{- end }}
{{- end }}
