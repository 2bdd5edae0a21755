{{/* The objects' namespace: .Values.namespace, else the release's. */}}
{{- define "stockade.namespace" -}}
{{- default .Release.Namespace .Values.namespace -}}
{{- end -}}

{{/* metadata.labels of every object: "stockade.labels" (dict "component" NAME) */}}
{{- define "stockade.labels" -}}
app.kubernetes.io/part-of: stockade
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Values checked as `stockade k8s manifests` checks them (the same messages). */}}
{{- define "stockade.validate" -}}
{{- if not (regexMatch "^https?://" (required "controller: required" .Values.controller)) -}}
{{- fail "controller: must be an http(s) URL" -}}
{{- end -}}
{{- if or (not .Values.image) (regexMatch "\\s" .Values.image) -}}
{{- fail "image: required, no spaces" -}}
{{- end -}}
{{- if not (has .Values.imagePullPolicy (list "Always" "IfNotPresent" "Never")) -}}
{{- fail "pull_policy: Always, IfNotPresent or Never" -}}
{{- end -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$" (include "stockade.namespace" .)) -}}
{{- fail "namespace: not a valid Kubernetes namespace name" -}}
{{- end -}}
{{- if or (not (hasPrefix "/" .Values.cniBinDir)) (has ".." (splitList "/" .Values.cniBinDir)) -}}
{{- fail "cni_bin_dir: an absolute path" -}}
{{- end -}}
{{- if and .Values.apiServer (not (regexMatch "^[^\\s/@]+:[0-9]{1,5}$" .Values.apiServer)) -}}
{{- fail "api_server: HOST:PORT" -}}
{{- end -}}
{{- end -}}

{{/* The API token volume: mounted only in the containers that talk to the apiserver. */}}
{{- define "stockade.apiTokenVolume" -}}
- name: kube-api
  projected:
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3600
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                apiVersion: v1
                fieldPath: metadata.namespace
{{- end -}}
{{- define "stockade.apiTokenMount" -}}
- name: kube-api
  mountPath: /var/run/secrets/kubernetes.io/serviceaccount
  readOnly: true
{{- end -}}
{{- define "stockade.caMount" -}}
{{- if .Values.ca }}
- name: ca
  mountPath: /etc/stockade/ca
  readOnly: true
{{- end -}}
{{- end -}}
{{- define "stockade.caVolume" -}}
{{- if .Values.ca }}
- name: ca
  configMap:
    name: stockade-ca
{{- end -}}
{{- end -}}
