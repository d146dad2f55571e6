{{/* The Secret holding the bearer token every call sends (key auth.secretKey). */}}
{{- define "esm.authSecret" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "esm.fullname" .)) -}}
{{- end -}}

{{/* grpc.health.v1 on the Serve proxy's port, as the kubelet calls it (no token): SERVING once a
replica is warm; a registry problem never fails it. Liveness waits out a long first model load. */}}
{{- define "esm.probes" -}}
readinessProbe:
  grpc: {port: {{ .Values.serve.grpcPort }}}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
livenessProbe:
  grpc: {port: {{ .Values.serve.grpcPort }}}
  initialDelaySeconds: {{ .Values.serve.livenessDelaySeconds }}
  periodSeconds: 30
  timeoutSeconds: 10
  failureThreshold: 10
{{- end -}}

{{/* Names: <release>-esm-adapters unless the release already says it. */}}
{{- define "esm.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "esm.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "esm.labels" -}}
{{ include "esm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "esm.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{- define "esm.registryClaim" -}}
{{- .Values.registry.existingClaim | default (printf "%s-registry" (include "esm.fullname" .)) -}}
{{- end -}}

{{/* Volumes every pod of ours mounts: the registry, the weights cache, scratch, secrets. */}}
{{- define "esm.volumes" -}}
- name: registry
  persistentVolumeClaim:
    claimName: {{ include "esm.registryClaim" . }}
- name: models
  {{- if .Values.model.cache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.cache.existingClaim }}
  {{- else }}
  emptyDir: {}
  {{- end }}
- name: tmp
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- if .Values.auth.enabled }}
- name: auth
  secret:
    secretName: {{ include "esm.authSecret" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.auth.secretKey }}
        path: token
{{- end }}
{{- end -}}

{{/* readOnly: the service never writes into the registry; only training and `push` do. */}}
{{- define "esm.volumeMounts" -}}
- name: registry
  mountPath: {{ .Values.registry.mountPath }}
  {{- if .readOnlyRegistry }}
  readOnly: true
  {{- end }}
- name: models
  mountPath: {{ .Values.model.cache.mountPath }}
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/esm-adapters/tls
  readOnly: true
{{- end }}
{{- if .Values.auth.enabled }}
- name: auth
  mountPath: /etc/esm-adapters/auth
  readOnly: true
{{- end }}
{{- end -}}

{{- define "esm.env" -}}
- name: HF_HOME
  value: {{ printf "%s/huggingface" .Values.model.cache.mountPath | quote }}
{{- if not .Values.model.baked }}
- name: TORCH_HOME
  value: {{ printf "%s/torch" .Values.model.cache.mountPath | quote }}
{{- end }}
- name: HOME
  value: /tmp
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
{{- if .Values.tls.enabled }}
- name: ESM_ADAPTERS_TLS_CERT_FILE
  value: /etc/esm-adapters/tls/tls.crt
- name: ESM_ADAPTERS_TLS_KEY_FILE
  value: /etc/esm-adapters/tls/tls.key
{{- end }}
{{- if .Values.auth.enabled }}
- name: ESM_ADAPTERS_AUTH_TOKEN_FILE
  value: /etc/esm-adapters/auth/token
{{- end }}
{{- end -}}

{{- define "esm.podSpecCommon" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}


{{/* TLS terminator beside each Ray container: Ray Serve's gRPC proxy speaks plaintext only. */}}
{{- define "esm.tlsSidecar" -}}
{{- if .Values.tls.enabled }}
- name: tls-front
  image: {{ include "esm.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["python3", "-m", "serving.serve.tls_front"]
  args:
    - --listen=0.0.0.0:{{ .Values.tls.port }}
    - --target=127.0.0.1:{{ .Values.serve.grpcPort }}
    - --cert=/etc/esm-adapters/tls/tls.crt
    - --key=/etc/esm-adapters/tls/tls.key
  ports:
    - {name: grpcs, containerPort: {{ .Values.tls.port }}}
  resources:
    {{- toYaml .Values.tls.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - {name: tls, mountPath: /etc/esm-adapters/tls, readOnly: true}
    - {name: tmp, mountPath: /tmp}
{{- end }}
{{- end -}}

{{/* The Secret holding Ray's token (key auth_token, as KubeRay's authOptions read it). */}}
{{- define "esm.rayTokenSecret" -}}
{{- .Values.rayAuth.existingSecret | default (printf "%s-ray-token" (include "esm.fullname" .)) -}}
{{- end -}}

{{/* Ray's token for a container KubeRay does not manage (the training Job), should it join the cluster. */}}
{{- define "esm.rayAuthEnv" -}}
{{- if .Values.rayAuth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "esm.rayTokenSecret" . }}
      key: auth_token
{{- end }}
{{- end -}}

{{/* A Ray cluster of its own for a RayJob (batch scoring, training on Ray): a head that runs no
work and `workers` pods with `gpus` GPUs each, the registry volume read-write, Ray token auth.
Call with (dict "root" $ "workers" N "gpus" G "resources" R). */}}
{{- define "esm.rayJobCluster" -}}
{{- $root := .root -}}
{{- $resources := deepCopy .resources -}}
{{- if gt (int .gpus) 0 -}}
{{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) (default dict $resources.limits)) -}}
{{- end -}}
rayVersion: {{ $root.Values.rayVersion | quote }}
authOptions:
  {{- if $root.Values.rayAuth.enabled }}
  mode: token
  secretName: {{ include "esm.rayTokenSecret" $root }}
  {{- else }}
  mode: disabled
  {{- end }}
headGroupSpec:
  rayStartParams:
    num-cpus: "0"
  template:
    metadata:
      labels:
        {{- include "esm.selectorLabels" $root | nindent 8 }}
        esm-adapters/role: ray
    spec:
      {{- include "esm.podSpecCommon" $root | nindent 6 }}
      containers:
        - name: ray-head
          image: {{ include "esm.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          env:
            {{- include "esm.env" $root | nindent 12 }}
          resources:
            {{- toYaml $root.Values.head.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            {{- include "esm.volumeMounts" (dict "Values" $root.Values "readOnlyRegistry" false) | nindent 12 }}
      volumes:
        {{- include "esm.volumes" $root | nindent 8 }}
workerGroupSpecs:
  - groupName: job
    replicas: {{ .workers }}
    minReplicas: {{ .workers }}
    maxReplicas: {{ .workers }}
    rayStartParams: {}
    template:
      metadata:
        labels:
          {{- include "esm.selectorLabels" $root | nindent 10 }}
          esm-adapters/role: ray
      spec:
        {{- include "esm.podSpecCommon" $root | nindent 8 }}
        containers:
          - name: ray-worker
            image: {{ include "esm.image" $root }}
            imagePullPolicy: {{ $root.Values.image.pullPolicy }}
            env:
              {{- include "esm.env" $root | nindent 14 }}
            resources:
              {{- toYaml $resources | nindent 14 }}
            securityContext:
              {{- toYaml $root.Values.containerSecurityContext | nindent 14 }}
            volumeMounts:
              {{- include "esm.volumeMounts" (dict "Values" $root.Values "readOnlyRegistry" false) | nindent 14 }}
        volumes:
          {{- include "esm.volumes" $root | nindent 10 }}
        {{- with $root.Values.workers.tolerations }}
        tolerations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
{{- end -}}
