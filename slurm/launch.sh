# Shared launcher of the slurm/*.sbatch files (sourced by each, never run on its own).
#
# Site set-up is by environment variable, exported before `sbatch` (sbatch passes the submitting
# shell's environment to the job) or written into the file MU_ENV_SETUP names:
#   MU_HOME             repository checkout the job runs in (default: the directory sbatch ran in)
#   MU_ENV_SETUP        a shell file sourced first: `module load ...`, `source venv/bin/activate`, exports
#   MU_VENV             a virtual environment to activate (shortcut for the line above)
#   MU_PYTHON           python interpreter of the commands (default: python3 on PATH after set-up)
#   MU_LAUNCHER         srun (default: one task per GPU) | torchrun (one srun task per node running torchrun)
#   MU_GPUS_PER_NODE    torchrun's --nproc-per-node (default: SLURM_GPUS_ON_NODE, else 8)
#   MU_CONTAINER_IMAGE  pyxis image: adds --container-image (and MU_CONTAINER_MOUNTS ->
#   MU_CONTAINER_MOUNTS --container-mounts, the checkout is the container's working directory)
#   MU_SRUN_ARGS        extra srun arguments for every step (e.g. "--cpu-bind=none")
#   MU_PREFLIGHT        0 skips the `megatron-uni info` check before srun (default 1)
#   MU_MAX_REQUEUES     give up requeueing after this many restarts (default 20)
# MASTER_ADDR is the first node's NodeAddr (works when node names are not resolvable host
# names), MASTER_PORT is derived from the job id (two jobs sharing a first node do not collide).

set -euo pipefail

mu_log() { echo "[$(date -u +%H:%M:%S) ${SLURM_JOB_ID:-nojob}] $*"; }

mu_setup_env() {
    MU_HOME=${MU_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$MU_HOME"
    if [ -n "${MU_ENV_SETUP:-}" ]; then
        # shellcheck disable=SC1090
        source "$MU_ENV_SETUP"
    fi
    if [ -n "${MU_VENV:-}" ]; then
        # shellcheck disable=SC1091
        source "$MU_VENV/bin/activate"
    fi
    MU_PYTHON=${MU_PYTHON:-python3}
    MU_LAUNCHER=${MU_LAUNCHER:-srun}
    export MU_HOME MU_PYTHON
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
    # torch.compile (compiled FlexAttention) on GPU nodes; off on CPU-only nodes, where it only
    # costs start-up time. An explicit TORCHDYNAMO_DISABLE from the environment wins.
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        export TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1}
    fi
}

# MASTER_ADDR from the first node's NodeAddr, MASTER_PORT in [20000, 40000) from the job id.
mu_master() {
    local head addr
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    addr=$(scontrol show node "$head" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
    export MASTER_ADDR=${MASTER_ADDR:-${addr:-$head}}
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    mu_log "job ${SLURM_JOB_NAME:-?} on ${SLURM_JOB_NODELIST}: master ${MASTER_ADDR}:${MASTER_PORT}," \
           "restart ${SLURM_RESTART_COUNT:-0}, launcher ${MU_LAUNCHER}"
}

mu_container_args() {
    if [ -n "${MU_CONTAINER_IMAGE:-}" ]; then
        printf '%s\n' "--container-image=$MU_CONTAINER_IMAGE" "--container-workdir=$MU_HOME"
        [ -z "${MU_CONTAINER_MOUNTS:-}" ] || printf '%s\n' "--container-mounts=$MU_CONTAINER_MOUNTS"
    fi
}

# World size of the step the launcher will start.
mu_world_size() {
    if [ "$MU_LAUNCHER" = torchrun ]; then
        echo $((SLURM_JOB_NUM_NODES * $(mu_gpus_per_node)))
    else
        echo "${SLURM_NTASKS:?SLURM_NTASKS unset: run under sbatch}"
    fi
}

mu_gpus_per_node() { echo "${MU_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"; }

# Run a short command once: in the batch shell, or in the container on the first node.
mu_once() {
    if [ -n "${MU_CONTAINER_IMAGE:-}" ]; then
        local -a container
        mapfile -t container < <(mu_container_args)
        srun --nodes=1 --ntasks=1 --overlap "${container[@]}" "$@"
    else
        "$@"
    fi
}

# Fail in seconds on a bad recipe or a layout that does not fit the allocation.
mu_preflight() {
    local recipe=$1; shift
    [ "${MU_PREFLIGHT:-1}" = 0 ] && return 0
    mu_log "preflight: $MU_PYTHON -m megatron_uni.cli info $recipe $* parallel.world_size=$(mu_world_size)"
    if ! mu_once "$MU_PYTHON" -m megatron_uni.cli info "$recipe" "$@" "parallel.world_size=$(mu_world_size)"; then
        mu_log "preflight failed: the recipe or layout above is invalid; nothing was started"
        exit 2
    fi
}

# The srun command line of a step running "$@" on every rank (or torchrun once per node).
mu_step_command() {
    local -a container extra
    mapfile -t container < <(mu_container_args)
    read -r -a extra <<< "${MU_SRUN_ARGS:-}"
    if [ "$MU_LAUNCHER" = torchrun ]; then
        local -a rest=("$@")
        [ "${rest[0]}" = "$MU_PYTHON" ] && rest=("${rest[@]:1}")
        # bash -c: the node rank is only known on the node; exec keeps torchrun the task
        MU_STEP=(srun --kill-on-bad-exit=1 --label --ntasks-per-node=1 --ntasks="$SLURM_JOB_NUM_NODES"
                 "${container[@]}" "${extra[@]}"
                 bash -c 'exec "$0" -m torch.distributed.run --node-rank="$SLURM_NODEID" "$@"' "$MU_PYTHON"
                 --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$(mu_gpus_per_node)"
                 --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" "${rest[@]}")
    else
        MU_STEP=(srun --kill-on-bad-exit=1 --label "${MU_STEP_ARGS[@]}" "${container[@]}" "${extra[@]}" "$@")
    fi
}

# ---------------------------------------------------------------------------------------------
# Pre-emption. Slurm sends USR1 to this batch shell N seconds before the time limit
# (--signal=B:USR1@N) or on `scancel --signal=USR1 --batch JOB`. The trap forwards it to the
# step (srun passes it to every task); the trainer saves at the end of its current step and exits.
# After the step the run's own checkpoint decides (slurm/run_state.py): requeue when the run is
# not finished and either the step ended cleanly (it saved and stopped early; 75: stopped during
# its set-up, training/stop.py) or this job was signalled (also a USR1 before the step started); otherwise the
# step's exit status is the job's, so a failed stage fails and its dependants never start.
# ---------------------------------------------------------------------------------------------
MU_STEP_ARGS=()
MU_SIGNALLED=0
MU_INTERRUPTED=0
MU_STEP_PID=

mu_on_usr1() {
    MU_SIGNALLED=1
    MU_INTERRUPTED=1
    mu_log "USR1 received: asking the step to save and stop"
    if [ -n "$MU_STEP_PID" ]; then
        kill -USR1 "$MU_STEP_PID" 2>/dev/null || true
    fi
}

# Start the step in the background and wait for its real exit status: a trapped signal makes
# `wait` return early (status > 128) while the step still runs, so wait again.
mu_run_step() {
    local status=
    mu_log "step: ${MU_STEP[*]}"
    "${MU_STEP[@]}" &
    MU_STEP_PID=$!
    while :; do
        MU_INTERRUPTED=0
        local got=0
        wait "$MU_STEP_PID" || got=$?
        if [ "$got" = 127 ] && [ -n "$status" ]; then
            break  # reaped by an earlier wait: keep its status
        fi
        status=$got
        [ "$MU_INTERRUPTED" = 1 ] || break
    done
    MU_STEP_PID=
    MU_STEP_STATUS=$status
    mu_log "step exited with status $status"
}

mu_requeue() {
    local restarts=${SLURM_RESTART_COUNT:-0}
    if [ "$restarts" -ge "${MU_MAX_REQUEUES:-20}" ]; then
        mu_log "not requeueing: already restarted $restarts times (MU_MAX_REQUEUES)"
        exit 1
    fi
    mu_log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1))): the next allocation resumes from the checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}

# Train RECIPE with overrides: preflight, srun, then requeue / success / failure as above.
mu_train() {
    local recipe=$1; shift
    trap mu_on_usr1 USR1
    mu_master
    mu_preflight "$recipe" "$@"
    if [ "$MU_SIGNALLED" = 1 ]; then
        mu_log "signalled before the step started"
        mu_requeue
    fi
    mu_step_command "$MU_PYTHON" -m megatron_uni.cli train "$recipe" "$@"
    mu_run_step
    local progress=0
    mu_once "$MU_PYTHON" "$MU_HOME/slurm/run_state.py" "$recipe" "$@" || progress=$?
    if [ "$progress" = 0 ]; then
        exit "$MU_STEP_STATUS"               # finished (a late USR1 changes nothing)
    elif [ "$progress" = 3 ] && { [ "$MU_STEP_STATUS" = 0 ] || [ "$MU_STEP_STATUS" = 75 ] || [ "$MU_SIGNALLED" = 1 ]; }; then
        mu_requeue
    fi
    mu_log "stage failed (step status $MU_STEP_STATUS, run state $progress)"
    [ "$MU_STEP_STATUS" != 0 ] && exit "$MU_STEP_STATUS"
    exit 1
}

# Run a tool (build_dataset, convert, ...) as one srun step (never torchrun): failure is the job's.
mu_tool() {
    MU_LAUNCHER=srun
    mu_master
    mu_step_command "$@"
    mu_run_step
    exit "$MU_STEP_STATUS"
}

mu_setup_env
