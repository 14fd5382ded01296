{{/* Chart name, truncated for label values. */}}
{{- define "cairn.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every object name. Cluster-scoped objects (ClusterRoles, bindings)
carry it too, so two releases never collide.
*/}}
{{- define "cairn.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "cairn.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "cairn.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cairn
{{- end }}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "operator"). */}}
{{- define "cairn.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cairn.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cairn.componentLabels" -}}
{{ include "cairn.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cairn.operator.serviceAccountName" -}}
{{- default (printf "%s-operator" (include "cairn.fullname" .)) .Values.operator.serviceAccount.name }}
{{- end }}

{{- define "cairn.agent.serviceAccountName" -}}
{{- default (printf "%s-agent" (include "cairn.fullname" .)) .Values.agent.serviceAccount.name }}
{{- end }}

{{/* image reference: call with (dict "ctx" $ "image" .Values.operator.image). */}}
{{- define "cairn.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{- define "cairn.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
{{- if kindIs "string" . }}
  - name: {{ . }}
{{- else }}
  - name: {{ .name }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Host paths the agent mounts, each at the same path inside the container (QEMU
on the host and the agent must agree on every path they exchange over QMP).
Fails on paths that would alias each other or escape with "..".
*/}}
{{- define "cairn.agent.hostPaths" -}}
{{- $paths := list (dict "name" "qmp-sockets" "path" .Values.socketDir) (dict "name" "runtime" "path" .Values.runtimeDir) (dict "name" "exports" "path" .Values.exportDir) (dict "name" "scratch" "path" .Values.scratchDir) }}
{{- range $i, $p := .Values.backupRoots }}
{{- $paths = append $paths (dict "name" (printf "backup-root-%d" $i) "path" $p "propagate" true) }}
{{- end }}
{{- range $i, $p := .Values.repositoryRoots }}
{{- $paths = append $paths (dict "name" (printf "repository-root-%d" $i) "path" $p "propagate" true) }}
{{- end }}
{{- range $i, $p := .Values.imageRoots }}
{{- $paths = append $paths (dict "name" (printf "image-root-%d" $i) "path" $p "propagate" true) }}
{{- end }}
{{- $seen := dict }}
{{- range $paths }}
{{- $clean := clean .path }}
{{- if or (contains "/../" (printf "%s/" .path)) (contains "/./" (printf "%s/" .path)) }}
{{- fail (printf "cairn: host path %q must be a clean absolute path (no . or .. segments)" .path) }}
{{- end }}
{{- if hasKey $seen $clean }}
{{- fail (printf "cairn: host path %q is listed twice (socketDir, runtimeDir, exportDir, scratchDir, backupRoots, repositoryRoots and imageRoots must be distinct)" .path) }}
{{- end }}
{{- $_ := set $seen $clean true }}
{{- end }}
{{- toJson (dict "paths" $paths) }}
{{- end }}
