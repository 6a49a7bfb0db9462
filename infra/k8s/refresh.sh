#!/bin/sh
# The nightly refresh, run by the CronJob in refresh-cronjob.yaml (from its ConfigMap).
# 1. Refuse to start while any ln-ray RayJob is unfinished: every run writes the same output
#    path and score cache (a one-off run included). The job itself takes the output's lease
#    (output.path/_lease.json) and stops at once while another live run holds it, from this
#    cluster or any other; this check only spares starting a cluster that would be refused.
# 2. Delete finished refresh RayJobs but the newest three (KubeRay deletes their clusters after
#    ttlSecondsAfterFinished, not the RayJob objects).
# 3. Create tonight's RayJob.
set -eu

unfinished=$(kubectl get rayjobs -l app.kubernetes.io/name=ln-ray \
  -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.jobDeploymentStatus}{"\n"}{end}' |
  awk '$2 != "Complete" && $2 != "Failed" {print $1}')
if [ -n "$unfinished" ]; then
  echo "ln-ray refresh not started: these runs are unfinished: $unfinished"
  exit 0
fi

kubectl get rayjobs -l app.kubernetes.io/component=refresh \
  --sort-by=.metadata.creationTimestamp \
  -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}' |
  awk -v keep=3 '{name[NR] = $0} END {for (i = 1; i <= NR - keep; i++) print name[i]}' |
  while read -r old; do kubectl delete rayjob "$old"; done

kubectl create -f /refresh/rayjob.yaml
