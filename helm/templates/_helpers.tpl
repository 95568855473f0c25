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
{{- end }}

{{- define "metascale.submitterName" -}}
{{- default (printf "%s-submitter" (include "metascale.fullname" .)) .Values.submitter.serviceAccount.name }}
{{- end }}

{{/* Rules the schema cannot hold, checked for one worker group: (dict "name" NAME "group" VALUES). */}}
{{- define "metascale.checkGroup" -}}
{{- $g := .group }}
{{- if not (and (le (int $g.minReplicas) (int $g.replicas)) (le (int $g.replicas) (int $g.maxReplicas))) }}
{{- fail (printf "worker group %s: need minReplicas (%v) <= replicas (%v) <= maxReplicas (%v)" .name $g.minReplicas $g.replicas $g.maxReplicas) }}
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

{{/*
A Ray pod template: (dict "root" $ "group" VALUES "container" NAME "automountToken" BOOL).
The W&B key enters only as a secretKeyRef; /tmp/ray is an emptyDir so the root filesystem stays untouched.
*/}}
{{- define "metascale.podTemplate" -}}
{{- $root := .root }}
{{- $g := .group }}
metadata:
  labels:
    {{- include "metascale.labels" $root | nindent 4 }}
    {{- with $g.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $g.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  automountServiceAccountToken: {{ .automountToken }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.common.podSecurityContext | nindent 4 }}
  containers:
    - name: {{ .container }}
      image: "{{ $root.Values.image.repository }}:{{ $root.Values.image.tag | default $root.Chart.AppVersion }}"
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      securityContext:
        {{- toYaml $root.Values.common.securityContext | nindent 8 }}
      env:
        - name: MALLOC_MMAP_THRESHOLD_
          value: "33554432"
        - name: MALLOC_TRIM_THRESHOLD_
          value: "68719476736"
        - name: MALLOC_TOP_PAD_
          value: "268435456"
        {{- if $root.Values.wandb.existingSecret }}
        - name: WANDB_API_KEY
          valueFrom:
            secretKeyRef:
              name: {{ $root.Values.wandb.existingSecret }}
              key: {{ $root.Values.wandb.secretKey }}
        {{- end }}
        {{- with $root.Values.common.containerEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $g.containerEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $g.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- toYaml $g.resources | nindent 8 }}
      volumeMounts:
        - name: ray-tmp
          mountPath: /tmp/ray
        {{- with $g.volumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: ray-tmp
      emptyDir: {}
    {{- with $g.volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{- define "metascale.workerGroup" -}}
{{- include "metascale.checkGroup" (dict "name" .name "group" .group) }}
- groupName: {{ .name }}
  replicas: {{ .group.replicas }}
  minReplicas: {{ .group.minReplicas }}
  maxReplicas: {{ .group.maxReplicas }}
  rayStartParams:
    {{- toYaml (.group.rayStartParams | default dict) | nindent 4 }}
  template:
    {{- include "metascale.podTemplate" (dict "root" .root "group" .group "container" "ray-worker" "automountToken" false) | nindent 4 }}
{{- end }}
