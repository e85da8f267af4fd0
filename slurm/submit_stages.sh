#!/bin/bash
# Submit the whole LLaDA2.0-Uni journey as a chain of Slurm jobs, each starting only when the
# previous one succeeded (--dependency=afterok, dependants of a failed job are cancelled):
#
#   import (HF LLaDA2.0-mini -> checkpoint, vocabulary expansion)
#   -> stage1_align -> stage2_pretrain -> stage3_sft_8k -> stage3_sft_16k
#   -> export (HF LLaDA2.0-Uni folder for inference and the decoder)
#
#   slurm/submit_stages.sh --hf HF_LLaDA2.0-mini --tokenizer models/LLaDA2.0-Uni \
#       --base HF_LLaDA2.0-Uni --run-dir runs/llada2_uni_16b -- data.path=data/llada2_uni/blend.yaml
#   slurm/submit_stages.sh ... --dry-run          # print every sbatch line and command, submit nothing
#
# Every stage saves to RUN_DIR/<step> and loads the previous step's RUN_DIR/<step>
# (checkpoint.load + checkpoint.finetune from the recipe). Logs: RUN_DIR/logs/<job name>-<job id>.{out,err},
# created here before Slurm opens them, appended to across requeues.
set -euo pipefail

STEPS=(import stage1_align stage2_pretrain stage3_sft_8k stage3_sft_16k export)

usage() {
    cat <<EOF
usage: slurm/submit_stages.sh [options] [-- section.key=value ...]

options:
  --scale 16b|tiny        recipe set under recipes/stages/ (default 16b; tiny: CPU, 2 nodes x 1 task)
  --run-dir DIR           checkpoints and logs of this run (default runs/llada2_uni_<scale>)
  --hf DIR                HF LLaDA2.0-mini folder to import (needed when the chain starts at import)
  --tokenizer DIR         tokenizer directory (recorded at import, copied at export, data.tokenizer)
  --base DIR              HF LLaDA2.0-Uni folder whose image_tokenizer/ decoder/ vae/ the export carries
  --from STEP, --to STEP  submit only STEP..STEP of: ${STEPS[*]}
  --after JOBID           make the first submitted job depend on JOBID too
  --export-args "ARGS"    extra tools/export_hf.py options (e.g. "--dtype float32 --link")
  --import-args "ARGS"    layout of the import (default 16b: "--ep 8", tiny: "--ep 2")
  --sbatch-args "ARGS"    extra sbatch options for the training jobs (tiny default:
                          "--nodes=2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1")
  --tool-args "ARGS"      extra sbatch options for import/export (tiny default: "--ntasks-per-node=2 --cpus-per-task=1")
  --dry-run               print the resolved sbatch command lines and the commands the jobs run
Overrides after -- apply to every training stage (e.g. data.path=..., schedule.train_iters=...).
Prints one line per submitted job: STEP JOBID.
EOF
}

SCALE=16b RUN_DIR= HF= TOKENIZER= BASE= FROM=import TO=export AFTER= DRY=0
IMPORT_ARGS= EXPORT_ARGS= SBATCH_ARGS= TOOL_ARGS= SET_IMPORT=0 SET_SBATCH=0 SET_TOOL=0
while [ $# -gt 0 ]; do
    case "$1" in
        --scale) SCALE=$2; shift 2 ;;
        --run-dir) RUN_DIR=$2; shift 2 ;;
        --hf) HF=$2; shift 2 ;;
        --tokenizer) TOKENIZER=$2; shift 2 ;;
        --base) BASE=$2; shift 2 ;;
        --from) FROM=$2; shift 2 ;;
        --to) TO=$2; shift 2 ;;
        --after) AFTER=$2; shift 2 ;;
        --import-args) IMPORT_ARGS=$2; SET_IMPORT=1; shift 2 ;;
        --export-args) EXPORT_ARGS=$2; shift 2 ;;
        --sbatch-args) SBATCH_ARGS=$2; SET_SBATCH=1; shift 2 ;;
        --tool-args) TOOL_ARGS=$2; SET_TOOL=1; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) echo "submit_stages.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
OVERRIDES=("$@")

die() { echo "submit_stages.sh: $*" >&2; exit 2; }
index_of() { local i; for i in "${!STEPS[@]}"; do [ "${STEPS[$i]}" = "$1" ] && { echo "$i"; return; }; done
             die "unknown step '$1'; steps: ${STEPS[*]}"; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$HERE"
case "$SCALE" in
    16b) [ $SET_IMPORT = 1 ] || IMPORT_ARGS="--ep 8" ;;
    tiny) [ $SET_IMPORT = 1 ] || IMPORT_ARGS="--ep 2"
          [ $SET_SBATCH = 1 ] || SBATCH_ARGS="--nodes=2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1"
          [ $SET_TOOL = 1 ] || TOOL_ARGS="--ntasks-per-node=2 --cpus-per-task=1" ;;
    *) die "--scale must be 16b or tiny, got '$SCALE'" ;;
esac
RECIPES=recipes/stages/$SCALE
RUN_DIR=${RUN_DIR:-runs/llada2_uni_$SCALE}
case "$RUN_DIR" in /*) ;; *) RUN_DIR=$HERE/$RUN_DIR ;; esac
FIRST=$(index_of "$FROM"); LAST=$(index_of "$TO")
[ "$FIRST" -le "$LAST" ] || die "--from $FROM comes after --to $TO"
if [ "$FIRST" = 0 ] && [ -z "$HF" ]; then die "the chain starts at import: give --hf HF_DIR (or --from stage1_align)"; fi
[ -z "$TOKENIZER" ] || OVERRIDES=("data.tokenizer=$TOKENIZER" "${OVERRIDES[@]}")

read -r -a SBATCH_EXTRA <<< "$SBATCH_ARGS"
read -r -a TOOL_EXTRA <<< "$TOOL_ARGS"
read -r -a IMPORT_EXTRA <<< "$IMPORT_ARGS"
read -r -a EXPORT_EXTRA <<< "$EXPORT_ARGS"

# The sbatch file and its arguments of one step: sets FILE, ARGS, EXTRA.
resolve() {
    local step=$1 prev=$2
    EXTRA=("${SBATCH_EXTRA[@]}")
    case "$step" in
        import)
            FILE=slurm/convert.sbatch EXTRA=("${TOOL_EXTRA[@]}")
            ARGS=(import "$HF" "$RUN_DIR/import" --recipe "$RECIPES/stage1_align.yaml" "${IMPORT_EXTRA[@]}" --no-progress)
            [ -z "$TOKENIZER" ] || ARGS+=(--tokenizer "$TOKENIZER") ;;
        export)
            FILE=slurm/convert.sbatch EXTRA=("${TOOL_EXTRA[@]}")
            ARGS=(export "$RUN_DIR/$prev" "$RUN_DIR/hf_export" "${EXPORT_EXTRA[@]}" --no-progress)
            [ -z "$TOKENIZER" ] || ARGS+=(--tokenizer "$TOKENIZER")
            [ -z "$BASE" ] || ARGS+=(--base "$BASE") ;;
        stage3_sft_8k|stage3_sft_16k)
            FILE=slurm/stage3_sft.sbatch
            ARGS=("${step#stage3_sft_}" "$RECIPES/$step.yaml") ;;
        *)
            FILE=slurm/$step.sbatch
            ARGS=("$RECIPES/$step.yaml") ;;
    esac
    case "$step" in
        import|export) ;;
        *) ARGS+=("checkpoint.load=$RUN_DIR/$prev" "checkpoint.save=$RUN_DIR/$step" "${OVERRIDES[@]}") ;;
    esac
}

quote() { local out= a; for a in "$@"; do out+="$(printf '%q' "$a") "; done; echo "${out% }"; }

[ "$DRY" = 1 ] || mkdir -p "$RUN_DIR/logs"
previous_job=$AFTER
for ((i = FIRST; i <= LAST; i++)); do
    step=${STEPS[$i]}
    prev=${STEPS[$((i > 0 ? i - 1 : 0))]}
    resolve "$step" "$prev"
    name=mu-$step
    SB=(sbatch --parsable --job-name="$name" --chdir="$HERE" --open-mode=append
        --output="$RUN_DIR/logs/%x-%j.out" --error="$RUN_DIR/logs/%x-%j.err")
    if [ -n "$previous_job" ]; then
        SB+=(--dependency="afterok:$previous_job" --kill-on-invalid-dep=yes)
    fi
    SB+=("${EXTRA[@]}" "$FILE" "${ARGS[@]}")
    if [ "$DRY" = 1 ]; then
        echo "# $step"
        echo "$(quote "${SB[@]}")"
        case "$step" in
            import) echo "#   runs: srun python tools/convert_hf_to_megatron.py $(quote "${ARGS[@]:1}")" ;;
            export) echo "#   runs: srun --ntasks=1 python tools/export_hf.py $(quote "${ARGS[@]:1}")" ;;
            stage3_sft_*) echo "#   runs: megatron-uni info (preflight), then srun python -m megatron_uni.cli train $(quote "${ARGS[@]:1}")" ;;
            *) echo "#   runs: megatron-uni info (preflight), then srun python -m megatron_uni.cli train $(quote "${ARGS[@]}")" ;;
        esac
        previous_job="<$step>"
    else
        job=$("${SB[@]}")
        job=${job%%;*}
        echo "$step $job"
        previous_job=$job
    fi
done
