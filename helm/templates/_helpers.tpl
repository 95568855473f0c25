{{- define "metascale.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Truncated to 47 characters: KubeRay derives Service and pod names from the RayCluster's name. */}}
{{- define "metascale.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "metascale.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "metascale.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "metascale.submitterName" -}}
{{- default (printf "%s-submitter" (include "metascale.fullname" .)) .Values.submitter.serviceAccount.name }}
{{- end }}

{{- define "metascale.claimName" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-data" (include "metascale.fullname" .)) }}
{{- end }}

{{/*
rayStartParams as KubeRay wants them, every value a string: initArgs (KubeRay's deprecated alias) overridden by
rayStartParams. Helm reads YAML numbers as float64, so whole numbers are printed as integers (never 1e+09).
*/}}
{{- define "metascale.rayStartParams" -}}
{{- $params := merge (deepCopy (.rayStartParams | default dict)) (.initArgs | default dict) }}
{{- if $params }}
{{- range $key, $value := $params }}
{{- if and (kindIs "float64" $value) (eq $value (float64 (int64 $value))) }}
{{ $key }}: {{ int64 $value | toString | quote }}
{{- else }}
{{ $key }}: {{ toString $value | quote }}
{{- end }}
{{- end }}
{{- else -}}
{}
{{- end }}
{{- end }}

{{/* Rules the schema cannot hold, checked for one worker group: (dict "name" NAME "group" VALUES "max" MAX). */}}
{{- define "metascale.checkGroup" -}}
{{- $g := .group }}
{{- if not (and (le (int ($g.minReplicas | default 0)) (int $g.replicas)) (le (int $g.replicas) (int .max))) }}
{{- fail (printf "worker group %s: need minReplicas (%v) <= replicas (%v) <= maxReplicas (%v)" .name ($g.minReplicas | default 0) $g.replicas .max) }}
{{- end }}
{{- $req := (($g.resources).requests) | default dict }}
{{- $lim := (($g.resources).limits) | default dict }}
{{- range $key := list "nvidia.com/gpu" "amd.com/gpu" }}
{{- if or (hasKey $req $key) (hasKey $lim $key) }}
{{- if ne (toString (get $req $key)) (toString (get $lim $key)) }}
{{- fail (printf "worker group %s: %s requests (%v) must equal limits (%v)" $.name $key (get $req $key) (get $lim $key)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "metascale.workerGroup" -}}
{{- $max := .group.replicas }}{{/* KubeRay: unbounded; here a group grows only when asked to */}}
{{- if hasKey .group "maxReplicas" }}{{ $max = .group.maxReplicas }}{{ end }}
{{- include "metascale.checkGroup" (dict "name" .name "group" .group "max" $max) }}
- groupName: {{ .name }}
  replicas: {{ int .group.replicas }}
  minReplicas: {{ int (.group.minReplicas | default 0) }}
  maxReplicas: {{ int $max }}
  {{- with .group.numOfHosts }}
  numOfHosts: {{ int . }}
  {{- end }}
  rayStartParams:
    {{- include "metascale.rayStartParams" .group | trim | nindent 4 }}
  template:
    {{- include "metascale.podTemplate" (dict "root" .root "group" .group "container" "ray-worker" "automountToken" false) | trim | nindent 4 }}
{{- end }}
