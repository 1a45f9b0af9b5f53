{{/*
The chart name, or nameOverride.
*/}}
{{- define "switchyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: fullnameOverride, else <release>-<name> (or the release
name alone when it already contains the name). At most 63 characters (a DNS label); names
built from it add at most 8 more ("-metrics") and are truncated again.
*/}}
{{- define "switchyard.fullname" -}}
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

{{/*
<fullname>-<suffix>, at most 63 characters. Call with (list . "suffix").
*/}}
{{- define "switchyard.suffixed" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "switchyard.fullname" $root | trunc (int (sub 62 (len (index . 1))))) (index . 1) | trimSuffix "-" }}
{{- end }}

{{/*
helm.sh/chart label value.
*/}}
{{- define "switchyard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object. Call with (dict "root" . "component" "operator").
*/}}
{{- define "switchyard.labels" -}}
helm.sh/chart: {{ include "switchyard.chart" .root }}
{{ include "switchyard.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | replace "+" "_" | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: switchyard
{{- end }}

{{/*
Selector labels (stable across upgrades). Call with (dict "root" . "component" "operator").
*/}}
{{- define "switchyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The operator's ServiceAccount name.
*/}}
{{- define "switchyard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "switchyard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false (the name of an existing ServiceAccount)" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator image reference: repository@digest, else repository:tag (tag defaults to
the chart's appVersion).
*/}}
{{- define "switchyard.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The leader-election Lease name.
*/}}
{{- define "switchyard.leaseName" -}}
{{- default (include "switchyard.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
The metrics Service name.
*/}}
{{- define "switchyard.metricsServiceName" -}}
{{- include "switchyard.suffixed" (list . "metrics") }}
{{- end }}

{{/*
Pod-level security context: accepted by Pod Security `restricted`.
*/}}
{{- define "switchyard.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Container-level security context: accepted by Pod Security `restricted`.
*/}}
{{- define "switchyard.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
The operator's permissions on the objects it manages, for the ClusterRole (or, with
watchNamespace, the Role in that namespace). Each rule names the code that needs it.
tests/tests/chart.rs pins the exact set, so a change here is deliberate.
*/}}
{{- define "switchyard.managerRules" -}}
# ModelDeployments: the Controller (main.rs, Controller::new) lists and watches them;
# main.rs check_crd_installed lists them at start-up. `get` adds nothing that `list`
# does not already grant, and keeps `kubectl auth can-i get` truthful.
# autoscale/run.rs copies: with spec.autoscaling.experts, the autoscaler writes
# spec.experts.replicaShards (a merge patch of that one field; the scale subresource
# carries the frontend count only).
- apiGroups: ["switchyard.dev"]
  resources: ["modeldeployments"]
  verbs: ["get", "list", "watch", "patch"]
# reconcile.rs write_status: server-side apply (PATCH) on the status subresource.
- apiGroups: ["switchyard.dev"]
  resources: ["modeldeployments/status"]
  verbs: ["patch"]
# autoscale/run.rs scale: the autoscaler writes spec.frontend.replicas through the scale
# subresource (as an HPA would), only where spec.autoscaling.enabled.
- apiGroups: ["switchyard.dev"]
  resources: ["modeldeployments/scale"]
  verbs: ["patch"]
# main.rs: the autoscaler watches frontend and expert-shard pods (label selector) for
# their readiness and address, to poll their /demand and /load.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# Children carry a controller owner reference with blockOwnerDeletion (build/mod.rs,
# controller_owner_ref). Where the OwnerReferencesPermissionEnforcement admission plugin
# is on (e.g. OpenShift), setting it requires `update` on the owner's finalizers.
- apiGroups: ["switchyard.dev"]
  resources: ["modeldeployments/finalizers"]
  verbs: ["update"]
# Owned workloads. reconcile.rs apply: server-side apply (PATCH, authorized as `create`
# too when the object does not exist yet); reconcile.rs get_opt reads both after a failed
# apply; main.rs .owns() lists and watches them.
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Owned Services (client + headless shard Service), the worker ConfigMap and the
# workers' ServiceAccount: reconcile.rs apply (server-side apply: patch, create) and
# main.rs .owns() (list, watch). placement/run.rs writes the balanced placement's
# ConfigMap (<md>-placement) the same way, and reads it back (get) when it starts.
- apiGroups: [""]
  resources: ["services", "configmaps", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Owned PodDisruptionBudgets (one per role): reconcile.rs apply, main.rs .owns().
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Owned NetworkPolicies (only frontends reach shards): reconcile.rs apply, main.rs .owns().
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch"]
# reconcile.rs prune: when experts.shards goes to 0 the shard StatefulSet, its headless
# Service, PDB and NetworkPolicy are deleted (only objects the ModelDeployment controls;
# build::prunable_kinds is this list).
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["delete"]
# placement/run.rs: the balanced placement's ConfigMap goes when the strategy returns to
# evenSpread or the shards to 0.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["delete"]
# spec.monitoring.podMonitor (reconcile.rs apply_dynamic and prune), where the Prometheus
# Operator's CRD is installed (found by discovery, which needs no grant): server-side
# apply (patch, create), and list + delete when it is turned off.
- apiGroups: ["monitoring.coreos.com"]
  resources: ["podmonitors"]
  verbs: ["list", "create", "patch", "delete"]
# Events on ModelDeployments: kube-runtime's Recorder::publish (reconcile.rs publish)
# creates an event, and merge-patches it when the same event repeats (event series).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
