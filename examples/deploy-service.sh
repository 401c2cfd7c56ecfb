#!/usr/bin/env bash
# Deploy one service to Cloud Run while holding its deployd lock.
#
#   examples/deploy-service.sh SERVICE
#
# The lock is taken before the image is built, so two people deploying the
# same service never build and ship at the same time; the second one waits
# in line and sees who is ahead. The lock is released in the EXIT trap with
# the script's exit code and the deployed revision, however the script ends.
# If the script is killed outright (SIGKILL), deployd sees this shell exit
# and frees the lock at once. A step that was running then (docker build,
# gcloud run deploy) is not stopped with it. To stop the whole process group
# as well, run the script under the lock instead:
#   deployd run SERVICE -- examples/deploy-service.sh SERVICE
# (its own acquire then joins that lease).
#
# Settings (environment):
#   GOOGLE_CLOUD_PROJECT   project to deploy to (default: gcloud's configured project)
#   DEPLOY_REGION          Cloud Run region (default europe-west1)
#   DEPLOY_REPOSITORY      Artifact Registry repository (default "services")
#   DEPLOY_COMMIT          commit to deploy (default: git rev-parse --short HEAD)
#   DEPLOY_REASON          why, shown to the team (default "deploy SERVICE")
#   DEPLOY_WAIT            how long to wait for the lock (default 15m)
#   DEPLOY_DRY_RUN=1       use stand-ins for docker and gcloud; they are also used when
#                          docker has no engine or gcloud has no project and account
#   DEPLOY_STEP_SECONDS    how long each stand-in step takes (default 3)
#   DEPLOYD                the deployd command (default: deployd on PATH)

set -euo pipefail

service=${1:?usage: deploy-service.sh SERVICE}
deployd=${DEPLOYD:-deployd}
region=${DEPLOY_REGION:-europe-west1}
repository=${DEPLOY_REPOSITORY:-services}
commit=${DEPLOY_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
reason=${DEPLOY_REASON:-deploy $service}
step_seconds=${DEPLOY_STEP_SECONDS:-3}
revision=""
lease_id=""

say() {
    printf '%s [%s %s] %s\n' "$(date +%H:%M:%S)" "$service" "$$" "$*" >&2
}

# Print why a real deploy cannot run here, or nothing when it can.
missing_tools() {
    if ! command -v docker >/dev/null 2>&1; then
        echo "docker is not installed"
    elif ! docker info >/dev/null 2>&1; then
        echo "docker has no engine to talk to"
    elif ! command -v gcloud >/dev/null 2>&1; then
        echo "gcloud is not installed"
    elif [ -z "${GOOGLE_CLOUD_PROJECT:-$(gcloud config get-value project 2>/dev/null)}" ]; then
        echo "no Google Cloud project is set (GOOGLE_CLOUD_PROJECT or gcloud config)"
    elif [ -z "$(gcloud auth list --filter=status:ACTIVE --format='value(account)' 2>/dev/null)" ]; then
        echo "gcloud has no active account (gcloud auth login)"
    fi
}

dry_run=${DEPLOY_DRY_RUN:-0}
if [ "$dry_run" != 1 ]; then
    why=$(missing_tools)
    if [ -n "$why" ]; then
        say "dry run: $why, so build and deploy are stand-ins"
        dry_run=1
    fi
fi
if [ "$dry_run" = 1 ]; then
    project=${GOOGLE_CLOUD_PROJECT:-example-project}
else
    project=${GOOGLE_CLOUD_PROJECT:-$(gcloud config get-value project 2>/dev/null)}
fi
image="$region-docker.pkg.dev/$project/$repository/$service:$commit"

release_lock() {
    local status=$?
    trap - EXIT
    # Only the lease this script took: a DEPLOYD_LEASE_ID inherited from an
    # outer deploy of another lock is not ours to release.
    if [ -n "$lease_id" ]; then
        if [ -n "$revision" ]; then
            "$deployd" release "$lease_id" --exit-code "$status" --revision "$revision" || true
        else
            "$deployd" release "$lease_id" --exit-code "$status" || true
        fi
    fi
    if [ "$status" -eq 0 ]; then
        say "done: $service is at revision $revision"
    else
        say "failed with exit code $status"
    fi
    exit "$status"
}
trap release_lock EXIT
# Turn signals into an exit with the usual code, so the EXIT trap records it.
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

build_image() {
    if [ "$dry_run" = 1 ]; then
        say "(dry run) docker build -t $image ."
        sleep "$step_seconds"
        return
    fi
    docker build --tag "$image" --label "org.opencontainers.image.revision=$commit" .
    docker push "$image"
}

deploy_image() {
    if [ "$dry_run" = 1 ]; then
        say "(dry run) gcloud run deploy $service --image $image --region $region"
        sleep "$step_seconds"
        return
    fi
    gcloud run deploy "$service" --image "$image" --region "$region" --project "$project" \
        --labels "commit=$commit,fencing-token=$DEPLOYD_FENCING_TOKEN" --quiet
}

read_revision() {
    if [ "$dry_run" = 1 ]; then
        printf '%s-%05d-%s\n' "$service" "$((RANDOM % 100000))" "$(tr -dc 'a-z' </dev/urandom | head -c 3)"
        return
    fi
    gcloud run services describe "$service" --region "$region" --project "$project" \
        --format 'value(status.latestReadyRevisionName)'
}

say "taking the deploy lock for $service (commit $commit)"
# Assign first, then eval: a failed acquire (busy, timed out) then stops the
# script through set -e instead of being hidden inside eval.
lease_env=$("$deployd" acquire "$service" --pid $$ --wait "${DEPLOY_WAIT:-15m}" \
    --commit "$commit" --reason "$reason" --format env)
eval "$lease_env"
lease_id=$DEPLOYD_LEASE_ID
say "got the lock: lease $DEPLOYD_LEASE_ID, fencing token $DEPLOYD_FENCING_TOKEN"

say "building $image"
build_image
say "deploying to Cloud Run in $region"
deploy_image
revision=$(read_revision)
say "Cloud Run serves revision $revision"
# Tell the team (in Slack, when the daemon has it configured) which revision
# is live. A failed report must not fail a deploy that already happened.
"$deployd" event "$service" deployed --revision "$revision" ||
    say "could not report the revision to deployd; the release reports it"
