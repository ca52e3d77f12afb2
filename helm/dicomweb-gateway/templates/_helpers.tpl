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

{{/* A URL carrying a password: user:password@ (or :password@) in the authority, or ?password=. */}}
{{- define "dicomweb-gateway.urlHasPassword" -}}
{{- if or (regexMatch "^[A-Za-z][A-Za-z0-9+.-]*://[^/?#@]*:[^/?#@]*@" .) (regexMatch "[?&]password=" .) }}true{{ end }}
{{- end }}

{{/* The Redis URL the replicas share: config.cache.url, else redis.url (either may carry a password). */}}
{{- define "dicomweb-gateway.redisUrl" -}}
{{- dig "cache" "url" "" .Values.config | default .Values.redis.url }}
{{- end }}

{{/* Where the pods get the Redis URL from:
     ""                   no Redis
     "config"             the ConfigMap (a URL without a password)
     "secret"             the chart's Secret <fullname>-redis, key url (a password in the URL or redis.password)
     "existing-url"       redis.existingSecret, key redis.existingSecretUrlKey (the whole URL)
     "existing-password"  redis.url, with the password from redis.existingSecret spliced in by the kubelet */}}
{{- define "dicomweb-gateway.redisMode" -}}
{{- $url := include "dicomweb-gateway.redisUrl" . }}
{{- if .Values.redis.existingSecret }}
{{- if .Values.redis.existingSecretUrlKey }}existing-url
{{- else if not $url }}
{{- fail "redis.existingSecret holds the password only (redis.existingSecretPasswordKey): set redis.url to the URL without it, or redis.existingSecretUrlKey for a Secret holding the whole URL" }}
{{- else if include "dicomweb-gateway.urlHasPassword" $url }}
{{- fail "redis.url carries a password while redis.existingSecret is set: leave the password out of the URL" }}
{{- else }}existing-password
{{- end }}
{{- else if .Values.redis.password }}
{{- if not $url }}
{{- fail "redis.password needs redis.url (the URL without the password)" }}
{{- else if include "dicomweb-gateway.urlHasPassword" $url }}
{{- fail "redis.password is set and the Redis URL carries a password too: keep one" }}
{{- end }}secret
{{- else if include "dicomweb-gateway.urlHasPassword" $url }}secret
{{- else if $url }}config
{{- end }}
{{- end }}

{{/* The whole Redis URL kept in the chart's Secret (mode "secret"). */}}
{{- define "dicomweb-gateway.redisSecretUrl" -}}
{{- $url := include "dicomweb-gateway.redisUrl" . }}
{{- if .Values.redis.password }}
{{- $password := .Values.redis.password | urlquery | replace "+" "%20" }}
{{- regexReplaceAll "^([A-Za-z][A-Za-z0-9+.-]*://)(?:([^/?#@:]*)@)?" $url (printf "${1}${2}:%s@" $password) }}
{{- else }}
{{- $url }}
{{- end }}
{{- end }}

{{/* redis.url with $(DWG_REDIS_PASSWORD) as its password (mode "existing-password"): the kubelet
     expands it from the variable defined before it, so the pod spec never holds the password. */}}
{{- define "dicomweb-gateway.redisComposedUrl" -}}
{{- regexReplaceAll "^([A-Za-z][A-Za-z0-9+.-]*://)(?:([^/?#@:]*)@)?" (include "dicomweb-gateway.redisUrl" .) "${1}${2}:$$(DWG_REDIS_PASSWORD)@" }}
{{- end }}

{{- define "dicomweb-gateway.redisSecretName" -}}
{{- .Values.redis.existingSecret | default (printf "%s-redis" (include "dicomweb-gateway.fullname" .)) }}
{{- end }}

{{/* The API keys the chart keeps in its Secret: auth.apiKeys plus any config.auth.api_keys. */}}
{{- define "dicomweb-gateway.apiKeys" -}}
{{- $keys := concat (.Values.auth.apiKeys | default list) (dig "auth" "api_keys" list .Values.config | default list) }}
{{- if and $keys .Values.auth.existingSecret }}
{{- fail "auth.existingSecret is set: leave auth.apiKeys and config.auth.api_keys empty (the keys come from the Secret)" }}
{{- end }}
{{- toJson $keys }}
{{- end }}

{{- define "dicomweb-gateway.authSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "dicomweb-gateway.fullname" .)) }}
{{- end }}

{{/* "true" when the pods get GATEWAY_AUTH__API_KEYS from a Secret. */}}
{{- define "dicomweb-gateway.hasApiKeys" -}}
{{- if or .Values.auth.existingSecret (include "dicomweb-gateway.apiKeys" . | fromJsonArray) }}true{{ end }}
{{- end }}

{{/* The cluster shared secret given in values (cluster.sharedSecret, else config.cluster.shared_secret). */}}
{{- define "dicomweb-gateway.sharedSecret" -}}
{{- .Values.cluster.sharedSecret | default (dig "cluster" "shared_secret" "" .Values.config) }}
{{- end }}

{{/* The config the pods read (the ConfigMap): .Values.config, with cache.url defaulting to a
     redis.url without a password, and without any secret: auth.api_keys, cluster.shared_secret and
     a cache.url carrying a password reach the pods from Secrets as GATEWAY_* variables; with
     tracing.headersSecret, tracing.headers_env names the variable the export headers come in. */}}
{{- define "dicomweb-gateway.config" -}}
{{- $config := deepCopy .Values.config }}
{{- $cache := get $config "cache" | default dict }}
{{- if eq (include "dicomweb-gateway.redisMode" .) "config" }}
{{- $_ := set $cache "url" (include "dicomweb-gateway.redisUrl" .) }}
{{- else }}
{{- $_ := unset $cache "url" }}
{{- end }}
{{- if $cache }}{{ $_ := set $config "cache" $cache }}{{ end }}
{{- with get $config "auth" }}{{ $_ := unset . "api_keys" }}{{ end }}
{{- with get $config "cluster" }}{{ $_ := unset . "shared_secret" }}{{ end }}
{{- if .Values.tracing.headersSecret }}
{{- $tracing := get $config "tracing" | default dict }}
{{- $_ := set $tracing "headers_env" "DWG_TRACING_HEADERS" }}
{{- $_ := set $config "tracing" $tracing }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* Replicas at most: autoscaling.maxReplicas when autoscaling, else replicaCount. */}}
{{- define "dicomweb-gateway.maxReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ .Values.autoscaling.maxReplicas }}{{ else }}{{ .Values.replicaCount }}{{ end }}
{{- end }}

{{/* "true" when the replicas share Redis: a Redis URL (ConfigMap or Secret), or GATEWAY_CACHE__URL in extraEnv. */}}
{{- define "dicomweb-gateway.hasRedis" -}}
{{- $found := not (empty (include "dicomweb-gateway.redisMode" .)) }}
{{- range .Values.extraEnv }}
{{- if eq .name "GATEWAY_CACHE__URL" }}{{ $found = true }}{{ end }}
{{- end }}
{{- if $found }}true{{ end }}
{{- end }}

{{/* The checksum that rolls the pods when a secret the chart manages from values changes (the
     Secrets of existingSecret are yours: restart the pods after rotating them). */}}
{{- define "dicomweb-gateway.secretsChecksum" -}}
{{- dict "apiKeys" (include "dicomweb-gateway.apiKeys" .) "redis" (include "dicomweb-gateway.redisSecretUrl" .) "cluster" (include "dicomweb-gateway.sharedSecret" .) | toJson | sha256sum }}
{{- end }}

{{/* The ports of config.nodes, once each (the NetworkPolicy's egress to the PACS). */}}
{{- define "dicomweb-gateway.pacsPorts" -}}
{{- $ports := list }}
{{- range .Values.config.nodes }}{{ $ports = append $ports (int .port) }}{{ end }}
{{- toJson ($ports | uniq) }}
{{- end }}

{{/* A NetworkPolicyPeer from {namespaceSelector, podSelector} (either may be empty: left out). */}}
{{- define "dicomweb-gateway.selectorPeer" -}}
{{- $peer := dict }}
{{- with . }}
{{- with .namespaceSelector }}{{ $_ := set $peer "namespaceSelector" . }}{{ end }}
{{- with .podSelector }}{{ $_ := set $peer "podSelector" . }}{{ end }}
{{- end }}
{{- if $peer }}{{ toYaml $peer }}{{ end }}
{{- end }}

{{/* Checks that would otherwise only show as a crash-looping pod. */}}
{{- define "dicomweb-gateway.validate" -}}
{{- $config := include "dicomweb-gateway.config" . | fromYaml }}
{{- if not $config.nodes }}
{{- fail "config.nodes: at least one PACS node is required (name, ae_title, host, port)" }}
{{- end }}
{{- $mode := dig "auth" "mode" "none" $config }}
{{- if and (eq $mode "none") (not .Values.allowUnauthenticated) }}
{{- fail "config.auth.mode is none: the gateway refuses to serve the pod network without authentication. Set allowUnauthenticated=true only behind an authenticating proxy." }}
{{- end }}
{{- if and (eq $mode "api_key") (not (include "dicomweb-gateway.hasApiKeys" .)) }}
{{- fail "config.auth.mode is api_key: set auth.apiKeys, or auth.existingSecret (a Secret holding the keys)" }}
{{- end }}
{{- $move := false }}
{{- range $config.nodes }}
{{- if eq (.retrieve | default "get") "move" }}{{ $move = true }}{{ end }}
{{- end }}
{{- if and $move (gt (int (include "dicomweb-gateway.maxReplicas" .)) 1) (not (and (include "dicomweb-gateway.hasRedis" .) (dig "cluster" "internal_port" "" $config))) }}
{{- fail "C-MOVE with more than one replica needs redis.url and config.cluster.internal_port: an instance may arrive at any replica, which hands it to the one that asked through Redis and the internal endpoint" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas is above autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not (or .Values.autoscaling.targetCPUUtilizationPercentage .Values.autoscaling.targetMemoryUtilizationPercentage)) }}
{{- fail "autoscaling: set targetCPUUtilizationPercentage and/or targetMemoryUtilizationPercentage" }}
{{- end }}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if and $pdb.enabled (eq (toString $pdb.maxUnavailable) "<nil>") (eq (toString $pdb.minAvailable) "<nil>") }}
{{- fail "podDisruptionBudget: set maxUnavailable or minAvailable" }}
{{- end }}
{{- if and $pdb.enabled (ne (toString $pdb.maxUnavailable) "<nil>") (ne (toString $pdb.minAvailable) "<nil>") }}
{{- fail "podDisruptionBudget: set maxUnavailable or minAvailable, not both" }}
{{- end }}
{{- $audit := .Values.audit }}
{{- if and $audit.enabled $audit.persistence.enabled (not $audit.persistence.existingClaim) (gt (int (include "dicomweb-gateway.maxReplicas" .)) 1) (not (has "ReadWriteMany" $audit.persistence.accessModes)) }}
{{- fail "audit.persistence: the replicas share one claim, so with more than one replica it must be ReadWriteMany (audit.persistence.accessModes)" }}
{{- end }}
{{- range .Values.tls.mounts }}
{{- if hasPrefix "/etc/dicomweb-gateway/" (printf "%s/" (.mountPath | default "/etc/dicomweb-gateway-tls" | trimSuffix "/")) }}
{{- fail (printf "tls.mounts: %s is inside the config volume (/etc/dicomweb-gateway): mount Secrets elsewhere, e.g. /etc/dicomweb-gateway-tls/%s" .mountPath .secretName) }}
{{- end }}
{{- end }}
{{- $np := .Values.networkPolicy }}
{{- if $np.enabled }}
{{- if not (or $np.pacs.cidrs $np.pacs.peers) }}
{{- fail "networkPolicy.enabled: set networkPolicy.pacs.cidrs (or pacs.peers), else the policy cuts the gateway off its PACS" }}
{{- end }}
{{- if and (include "dicomweb-gateway.hasRedis" .) (not (or $np.redis.cidrs $np.redis.peers)) }}
{{- fail "networkPolicy.enabled with Redis: set networkPolicy.redis.cidrs (or redis.peers), else the policy cuts the gateway off Redis" }}
{{- end }}
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
