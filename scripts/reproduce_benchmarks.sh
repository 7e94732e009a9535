#!/usr/bin/env bash
# Train every benchmark recipe (conf/experiment/{cub200,cars196,sop,inshop}_{resnet50,vit_small})
# on a GPU machine and write their table to experiments/YYYY-MM-DD_benchmarks_gpu.md; then score
# the evaluation recipes on Revisited Oxford / Paris (conf/experiment/revisited_*.yaml, run as
# {roxford5k,rparis6k}_{resnet50_gem,dinov2_gem,resnet101_gem}; their E/M/H table is in each
# run's log). resnet101_gem scores cirtorch's recipe: sfm120k_resnet101_gem is trained first on
# SfM-120k (its checkpoint, and the whitening learned on SfM-120k), once for both datasets.
# With DATA_ROOT/revisitop1m/ (the R1M distractors) each is scored +R1M as well
# (<name>+r1m: +distractors=r1m, the protocol "revisited+R1M").
#
#   DATA_ROOT=/data bash scripts/reproduce_benchmarks.sh                     # all eight
#   DATA_ROOT=/data bash scripts/reproduce_benchmarks.sh --only cub200_resnet50 --only sop_vit_small
#   DATA_ROOT=/data DRY_RUN=1 bash scripts/reproduce_benchmarks.sh           # print the commands
#
# DATA_ROOT holds the datasets in their official layouts (data/README.md): CUB_200_2011/,
# cars196/, Stanford_Online_Products/, InShop/, roxford5k/, rparis6k/, sfm120k/, revisitop1m/. A
# missing dataset skips its recipes with a message; the others still run. Environment: RUNS (run folders, default
# logs/benchmarks/<date_time>), OUT (the table), WORKERS (data.num_workers, default 8),
# OVERRIDES (more train.py overrides, e.g. "logger=csv trainer.devices=4"). Pretrained weights
# must be in the Hugging Face cache or downloadable (see README, "Pretrained weights").
# Exit status: 0 when every recipe that could run succeeded, 1 when one failed or none could run.
set -uo pipefail
cd "$(dirname "$0")/.."

RECIPES=(cub200_resnet50 cub200_vit_small cars196_resnet50 cars196_vit_small
         sop_resnet50 sop_vit_small inshop_resnet50 inshop_vit_small)
# evaluation recipes: <dataset>_<recipe> runs evaluate.py experiment=revisited_<recipe> data=<dataset>
EVALUATIONS=(roxford5k_resnet50_gem roxford5k_dinov2_gem roxford5k_resnet101_gem
             rparis6k_resnet50_gem rparis6k_dinov2_gem rparis6k_resnet101_gem)
# evaluation recipe -> the training recipe whose checkpoint it scores (trained once, first)
trained_for() { [ "$1" = resnet101_gem ] && echo sfm120k_resnet101_gem; }
STAMP=$(date +%Y-%m-%d_%H-%M-%S)
RUNS=${RUNS:-logs/benchmarks/$STAMP}
OUT=${OUT:-experiments/$(date +%Y-%m-%d)_benchmarks_gpu.md}
WORKERS=${WORKERS:-8}
OVERRIDES=${OVERRIDES:-}
DRY_RUN=${DRY_RUN:-0}

only=()
while [ $# -gt 0 ]; do
    case "$1" in
        --only) [ $# -ge 2 ] || { echo "--only needs a recipe name" >&2; exit 2; }
                only+=("$2"); shift 2 ;;
        --only=*) only+=("${1#--only=}"); shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "unknown argument '$1' (use --only NAME, or DRY_RUN=1)" >&2; exit 2 ;;
    esac
done
if [ ${#only[@]} -gt 0 ]; then
    chosen=()
    chosen_evaluations=()
    for name in "${only[@]}"; do
        if [ -f "conf/experiment/$name.yaml" ] && [[ " ${RECIPES[*]} " == *" $name "* ]]; then
            chosen+=("$name")
        elif [[ " ${EVALUATIONS[*]} " == *" $name "* ]]; then
            chosen_evaluations+=("$name")
        else
            echo "--only $name: not a benchmark recipe; choose from: ${RECIPES[*]} ${EVALUATIONS[*]}" >&2
            exit 2
        fi
    done
    RECIPES=("${chosen[@]}")
    EVALUATIONS=("${chosen_evaluations[@]}")
fi
if [ -z "${DATA_ROOT:-}" ]; then
    echo "set DATA_ROOT to the folder holding CUB_200_2011/, cars196/, Stanford_Online_Products/, InShop/" >&2
    exit 2
fi

# dataset -> folder under DATA_ROOT and the file its converter reads first
folder_of() {
    case "$1" in
        cub200) echo CUB_200_2011 ;;
        cars196) echo cars196 ;;
        sop) echo Stanford_Online_Products ;;
        inshop) echo InShop ;;
        roxford5k|rparis6k|sfm120k|revisitop1m) echo "$1" ;;
    esac
}
layout_ok() {  # dataset root -> 0 when the official layout's index file is there
    case "$1" in
        cub200) [ -f "$2/images.txt" ] || [ -f "$2/CUB_200_2011/images.txt" ] ;;
        cars196) [ -f "$2/cars_annos.mat" ] || [ -f "$2/cars_annos.csv" ] ;;
        sop) [ -f "$2/Ebay_train.txt" ] && [ -f "$2/Ebay_test.txt" ] ;;
        inshop) [ -f "$2/list_eval_partition.txt" ] || [ -f "$2/Eval/list_eval_partition.txt" ] ;;
        roxford5k|rparis6k) [ -f "$2/gnd_$1.pkl" ] && [ -d "$2/jpg" ] ;;
        sfm120k) [ -f "$2/retrieval-SfM-120k.pkl" ] && [ -d "$2/ims" ] ;;
        revisitop1m) [ -f "$2/revisitop1m.txt" ] && [ -d "$2/jpg" ] ;;
    esac
}
layout_hint() {
    case "$1" in
        cub200) echo "images.txt, image_class_labels.txt, images/" ;;
        cars196) echo "cars_annos.mat (or cars_annos.csv), car_ims/" ;;
        sop) echo "Ebay_train.txt, Ebay_test.txt, <category>_final/" ;;
        inshop) echo "list_eval_partition.txt (or Eval/), img/" ;;
        roxford5k|rparis6k) echo "jpg/, gnd_$1.pkl" ;;
        sfm120k) echo "retrieval-SfM-120k.pkl, ims/" ;;
    esac
}

run() {  # print the command; run it unless DRY_RUN=1
    echo "+ $*"
    [ "$DRY_RUN" = 1 ] || "$@"
}

failed=0
ran=0
for name in "${RECIPES[@]}"; do
    dataset=${name%%_*}
    root="$DATA_ROOT/$(folder_of "$dataset")"
    dir="$RUNS/$name"
    if ! layout_ok "$dataset" "$root"; then
        reason="$root does not hold the $dataset layout ($(layout_hint "$dataset")); see data/README.md"
        echo "skipping $name: $reason" >&2
        if [ "$DRY_RUN" != 1 ]; then
            mkdir -p "$dir" && echo "$reason" > "$dir/skipped.txt"
        fi
        continue
    fi
    # shellcheck disable=SC2086  # OVERRIDES is a list of words
    command=(python train.py "experiment=$name" "data.root=$root" "data.num_workers=$WORKERS"
             "hydra.run.dir=$dir" $OVERRIDES)
    ran=$((ran + 1))
    if [ "$DRY_RUN" = 1 ]; then
        echo "+ ${command[*]} > $dir/train.log"
        continue
    fi
    mkdir -p "$dir"
    echo "== $name (log: $dir/train.log)"
    start=$(date +%s)
    "${command[@]}" > "$dir/train.log" 2>&1
    status=$?
    echo "$(( $(date +%s) - start ))" > "$dir/wall_s"
    if [ $status = 0 ]; then
        echo "   done in $(cat "$dir/wall_s") s"
    else
        echo "   FAILED (exit $status): see $dir/train.log" >&2
        failed=1
    fi
done

landmark_model() {  # training recipe -> 0 once its checkpoint is there (trained now if needed)
    local root="$DATA_ROOT/sfm120k" dir="$RUNS/$1"
    [[ " $broken " == *" $1 "* ]] && return 1
    [ -f "$dir/checkpoints/best.ckpt" ] || [[ " $trained " == *" $1 "* ]] && return 0
    if ! layout_ok sfm120k "$root"; then
        echo "skipping $1: $root does not hold the sfm120k layout ($(layout_hint sfm120k)); see data/README.md" >&2
        return 1
    fi
    # shellcheck disable=SC2086  # OVERRIDES is a list of words
    command=(python train.py "experiment=$1" "data.root=$root" "data.num_workers=$WORKERS"
             "hydra.run.dir=$dir" $OVERRIDES)
    trained+=" $1"
    if [ "$DRY_RUN" = 1 ]; then
        echo "+ ${command[*]} > $dir/train.log"
        return 0
    fi
    mkdir -p "$dir"
    echo "== $1 (log: $dir/train.log)"
    "${command[@]}" > "$dir/train.log" 2>&1 && return 0
    echo "   FAILED: see $dir/train.log" >&2
    failed=1
    broken+=" $1"
    return 1
}

evaluate_one() {  # name, then extra evaluate.py overrides
    local name=$1 dataset=${1%%_*} recipe=${1#*_}
    recipe=${recipe%+r1m}
    shift
    local dir="$RUNS/$name" root extra=()
    root="$DATA_ROOT/$(folder_of "$dataset")"
    local training
    training=$(trained_for "$recipe")
    if [ -n "$training" ]; then
        landmark_model "$training" || return 0
        extra=("ckpt_path=$RUNS/$training/checkpoints/best.ckpt" "fit_data.root=$DATA_ROOT/sfm120k")
    fi
    # shellcheck disable=SC2086  # OVERRIDES is a list of words
    command=(python evaluate.py "experiment=revisited_$recipe" "data=$dataset" "data.root=$root"
             "data.num_workers=$WORKERS" "${extra[@]}" "$@" "hydra.run.dir=$dir" $OVERRIDES)
    ran=$((ran + 1))
    if [ "$DRY_RUN" = 1 ]; then
        echo "+ ${command[*]} > $dir/evaluate.log"
        return 0
    fi
    mkdir -p "$dir"
    echo "== $name (log: $dir/evaluate.log)"
    if ! "${command[@]}" > "$dir/evaluate.log" 2>&1; then
        echo "   FAILED: see $dir/evaluate.log" >&2
        failed=1
    fi
}

trained=""  # training recipes run (or printed) so far, and those that failed
broken=""
distractors="$DATA_ROOT/$(folder_of revisitop1m)"
for name in "${EVALUATIONS[@]}"; do
    dataset=${name%%_*}
    root="$DATA_ROOT/$(folder_of "$dataset")"
    if ! layout_ok "$dataset" "$root"; then
        echo "skipping $name: $root does not hold the $dataset layout ($(layout_hint "$dataset")); see data/README.md" >&2
        continue
    fi
    evaluate_one "$name"
    if layout_ok revisitop1m "$distractors"; then
        evaluate_one "$name+r1m" +distractors=r1m "distractors.root=$distractors"
    fi
done

if [ $ran = 0 ]; then
    echo "no recipe could run: none of their datasets is under DATA_ROOT=$DATA_ROOT" >&2
    failed=1
fi
described="DATA_ROOT=$DATA_ROOT bash scripts/reproduce_benchmarks.sh"
for name in "${only[@]}"; do described+=" --only $name"; done
if [ ${#RECIPES[@]} -gt 0 ]; then
    run python scripts/benchmark_table.py "$RUNS" --recipes "${RECIPES[@]}" --output "$OUT" \
        --command "$described"
fi
exit $failed
