{{/*
A Ray pod template: (dict "root" $ "group" VALUES "container" NAME "automountToken" BOOL), honouring the pod keys of
KubeRay's ray-cluster chart. Security contexts are common's, overridden key by key by the group's. The W&B key enters
only as a secretKeyRef. /tmp/ray is an emptyDir (the root filesystem stays untouched) unless the group mounts its own
volume there, as KubeRay's default values do; the persistence claim, when enabled, is mounted in every pod.
*/}}
{{- define "metascale.podTemplate" -}}
{{- $root := .root }}
{{- $g := .group }}
{{- $image := $g.image | default dict }}
{{- $podSecurity := deepCopy $root.Values.common.podSecurityContext }}
{{- range $k, $v := $g.podSecurityContext }}{{ $_ := set $podSecurity $k $v }}{{ end }}
{{- $security := deepCopy ($root.Values.common.securityContext | default dict) }}
{{- range $k, $v := $g.securityContext }}{{ $_ := set $security $k $v }}{{ end }}
{{- $mounts := list }}
{{- $volumes := list }}
{{- $ownRayTmp := true }}
{{- range $g.volumeMounts }}{{ if eq (trimSuffix "/" .mountPath) "/tmp/ray" }}{{ $ownRayTmp = false }}{{ end }}{{ end }}
{{- if $ownRayTmp }}
{{- $mounts = append $mounts (dict "name" "ray-tmp" "mountPath" "/tmp/ray") }}
{{- $volumes = append $volumes (dict "name" "ray-tmp" "emptyDir" dict) }}
{{- end }}
{{- with $root.Values.persistence }}{{ if .enabled }}
{{- $mount := dict "name" "metascale-data" "mountPath" .mountPath }}
{{- with .subPath }}{{ $_ := set $mount "subPath" . }}{{ end }}
{{- $mounts = append $mounts $mount }}
{{- $volumes = append $volumes (dict "name" "metascale-data" "persistentVolumeClaim" (dict "claimName" (include "metascale.claimName" $root))) }}
{{- end }}{{ end }}
{{- $mounts = concat $mounts ($g.volumeMounts | default list) }}
{{- $volumes = concat $volumes ($g.volumes | default list) }}
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
  {{- with $g.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $podSecurity | nindent 4 }}
  {{- with $g.initContainers }}
  initContainers:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: "{{ $image.repository | default $root.Values.image.repository }}:{{ $image.tag | default $root.Values.image.tag | default $root.Chart.AppVersion }}"
      imagePullPolicy: {{ $image.pullPolicy | default $root.Values.image.pullPolicy }}
      {{- with $g.command }}
      command:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.args }}
      args:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $security | nindent 8 }}
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
      {{- with $g.ports }}
      ports:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- toYaml $g.resources | nindent 8 }}
      {{- with $g.lifecycle }}
      lifecycle:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        {{- toYaml $mounts | nindent 8 }}
    {{- with $g.sidecarContainers }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  volumes:
    {{- toYaml $volumes | nindent 4 }}
  {{- range $key := list "nodeSelector" "tolerations" "affinity" "topologySpreadConstraints" "dnsConfig" "resourceClaims" }}
  {{- with get $g $key }}
  {{ $key }}:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- end }}
  {{- range $key := list "priorityClassName" "runtimeClassName" "restartPolicy" }}
  {{- with get $g $key }}
  {{ $key }}: {{ . }}
  {{- end }}
  {{- end }}
  {{- if hasKey $g "priority" }}
  priority: {{ int $g.priority }}
  {{- end }}
{{- end }}
