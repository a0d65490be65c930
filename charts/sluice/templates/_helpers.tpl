{{/* Names, labels and the pieces several templates share. */}}

{{- define "sluice.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sluice.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sluice.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: include "sluice.selector" (list . "injector") */}}
{{- define "sluice.selector" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "sluice.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "sluice.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "sluice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sluice.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "sluice.injectorName" -}}{{ include "sluice.fullname" . }}-injector{{- end -}}
{{- define "sluice.configName" -}}{{ include "sluice.fullname" . }}-config{{- end -}}
{{- define "sluice.redisSecretName" -}}{{ include "sluice.fullname" . }}-redis{{- end -}}

{{- define "sluice.caSecretName" -}}
{{- default (printf "%s-ca" (include "sluice.fullname" .)) .Values.ca.existingSecret -}}
{{- end -}}

{{/* Namespaces that hold sluice's config and CA: the injected ones, or the release namespace. */}}
{{- define "sluice.namespaces" -}}
{{- if eq .Values.mode "standalone" -}}
{{- list .Release.Namespace | toJson -}}
{{- else -}}
{{- .Values.sidecar.namespaces | uniq | toJson -}}
{{- end -}}
{{- end -}}

{{/*
The sluice config for one object: include "sluice.config" (list $ $overrides).
`listen` comes from the mode: a sidecar serves only its own pod (127.0.0.1), a standalone pod
serves the cluster (with `allow_remote_clients`, or `clients:` in the config for authentication).
The CA paths point at the mounted CA Secret.
*/}}
{{- define "sluice.config" -}}
{{- $root := index . 0 -}}
{{- $overrides := index . 1 -}}
{{- $config := mergeOverwrite (deepCopy $root.Values.config) (deepCopy $overrides) -}}
{{- $proxyHost := ternary "0.0.0.0" "127.0.0.1" (eq $root.Values.mode "standalone") -}}
{{- $listen := dict "proxy" (printf "%s:%d" $proxyHost (int $root.Values.ports.proxy)) "admin" (printf "0.0.0.0:%d" (int $root.Values.ports.admin)) -}}
{{- if and (eq $root.Values.mode "standalone") $root.Values.standalone.allowRemoteClients -}}
{{- $_ := set $listen "allow_remote_clients" true -}}
{{- end -}}
{{- $_ := set $config "listen" $listen -}}
{{- $intercept := default (dict) $config.intercept -}}
{{- $_ := set $intercept "ca_cert" "/etc/sluice/ca/ca.crt" -}}
{{- $_ := set $intercept "ca_key" "/etc/sluice/ca/ca.key" -}}
{{- $_ := set $config "intercept" $intercept -}}
{{- if $root.Values.redis.enabled -}}
{{- $store := default (dict) $config.store -}}
{{- $_ := set $store "kind" "redis" -}}
{{- $_ := set $store "url" $root.Values.redis.url -}}
{{- $_ := set $store "on_failure" $root.Values.redis.onFailure -}}
{{- $_ := set $store "timeout" $root.Values.redis.timeout -}}
{{- $_ := set $config "store" $store -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Whether to render Prometheus Operator objects. */}}
{{- define "sluice.monitoring" -}}
{{- $setting := toString .Values.monitoring.enabled -}}
{{- if or (eq $setting "true") (and (eq $setting "auto") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) -}}
true
{{- end -}}
{{- end -}}

{{/* Sanity checks that fail the render with a message instead of producing broken objects. */}}
{{- define "sluice.validate" -}}
{{- if not (has .Values.mode (list "sidecar" "standalone")) -}}
{{- fail (printf "mode must be sidecar or standalone, not %q" .Values.mode) -}}
{{- end -}}
{{- if not (has .Values.sidecar.mode (list "native" "container")) -}}
{{- fail (printf "sidecar.mode must be native or container, not %q" .Values.sidecar.mode) -}}
{{- end -}}
{{- if not (has .Values.sidecar.caBundle (list "init" "secret")) -}}
{{- fail (printf "sidecar.caBundle must be init or secret, not %q" .Values.sidecar.caBundle) -}}
{{- end -}}
{{- if not (has .Values.configKind (list "ConfigMap" "Secret")) -}}
{{- fail (printf "configKind must be ConfigMap or Secret, not %q" .Values.configKind) -}}
{{- end -}}
{{- if not (has .Values.injector.failurePolicy (list "Ignore" "Fail")) -}}
{{- fail (printf "injector.failurePolicy must be Ignore or Fail, not %q" .Values.injector.failurePolicy) -}}
{{- end -}}
{{- if and .Values.ca.cert (not .Values.ca.key) -}}
{{- fail "ca.cert needs ca.key" -}}
{{- end -}}
{{- if .Values.redis.enabled -}}
{{- if not .Values.redis.url -}}
{{- fail "redis.enabled needs redis.url" -}}
{{- end -}}
{{- if and (regexMatch "^[a-z+]+://[^@/]*:[^@/]*@" .Values.redis.url) (ne .Values.configKind "Secret") -}}
{{- fail "redis.url carries a password: set configKind=Secret so it is not stored in a ConfigMap" -}}
{{- end -}}
{{- end -}}
{{- if hasKey .Values.config "listen" -}}
{{- fail "config.listen is set by the chart from ports and mode; remove it" -}}
{{- end -}}
{{- if and (eq .Values.mode "sidecar") (eq .Values.sidecar.caBundle "secret") (not .Values.ca.existingSecret) (not .Values.ca.systemRoots) -}}
{{- fail "sidecar.caBundle=secret needs ca.systemRoots (--set-file ca.systemRoots=/etc/ssl/certs/ca-certificates.crt) or ca.existingSecret with ca-bundle.pem" -}}
{{- end -}}
{{- end -}}

{{/*
An RSA private key in PKCS#8 ("BEGIN PRIVATE KEY"), the only form sluice reads (rcgen on ring).
genCA writes PKCS#1 ("BEGIN RSA PRIVATE KEY"), so the DER is wrapped here:
  SEQUENCE { INTEGER 0, AlgorithmIdentifier { rsaEncryption, NULL }, OCTET STRING { pkcs1 } }
Lengths use the two-byte long form (0x82), right for any RSA key from 2048 to 4096 bits.
PKCS#8 input passes through; anything else fails the render with a hint.
*/}}
{{- define "sluice.pkcs8" -}}
{{- if contains "BEGIN PRIVATE KEY" . -}}
{{- . -}}
{{- else if contains "BEGIN RSA PRIVATE KEY" . -}}
{{- $der := regexReplaceAll "-----[A-Z ]+-----|\\s" . "" | b64dec -}}
{{- $n := len $der -}}
{{- $head := b64dec "MII=" -}}
{{- $algorithm := b64dec "AgEAMA0GCSqGSIb3DQEBAQUABII=" -}}
{{- $body := printf "%s%s%s%s%s" $head (include "sluice.u16" (add $n 22)) $algorithm (include "sluice.u16" $n) $der -}}
{{- printf "-----BEGIN PRIVATE KEY-----\n%s\n-----END PRIVATE KEY-----\n" (regexFindAll ".{1,64}" (b64enc $body) -1 | join "\n") -}}
{{- else -}}
{{- fail "ca.key must be PKCS#8 (BEGIN PRIVATE KEY) or RSA PKCS#1; convert with: openssl pkcs8 -topk8 -nocrypt -in ca.key" -}}
{{- end -}}
{{- end -}}

{{/* Two raw bytes, big-endian, of a number below 65536 (via base64, the one byte-exact path). */}}
{{- define "sluice.u16" -}}
{{- $alphabet := "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/" -}}
{{- $high := div . 256 -}}
{{- $low := mod . 256 -}}
{{- $a := div $high 4 -}}
{{- $b := add (mul (mod $high 4) 16) (div $low 16) -}}
{{- $c := mul (mod $low 16) 4 -}}
{{- $chars := list -}}
{{- range $index := list $a $b $c -}}
{{- $chars = append $chars (substr (int $index) (int (add $index 1)) $alphabet) -}}
{{- end -}}
{{- printf "%s=" (join "" $chars) | b64dec -}}
{{- end -}}
