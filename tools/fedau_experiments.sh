#!/bin/sh
# Reproduces docs/results.md (FedAU section): the FedAU paper's setting on
# Fashion-MNIST (250 clients, Dirichlet alpha 0.1, pbar 0.1, pmin 0.02, 5 local
# steps of batch 16, softmax, 2000 rounds, accuracy every 20 rounds averaged over
# the last 500) for each participation pattern and seed, comparing fedavg over
# participants, fedavg over all (server lr 10), fedau and fedau with K = 50.
#   tools/fedau_experiments.sh OUTDIR [PATTERNS] [SEEDS]
# defaults: PATTERNS="bernoulli markov cyclic", SEEDS="1 2 3". About 100 s per
# run on 2 cores, 4 runs per pattern and seed.
set -eu
out=${1:?usage: $0 OUTDIR [PATTERNS] [SEEDS]}
patterns=${2:-bernoulli markov cyclic}
seeds=${3:-1 2 3}
cohort=${COHORT:-build/client/cli/cohort}
mkdir -p "$out"
for pat in $patterns; do
  for seed in $seeds; do
    "$cohort" sim --clients 250 --rounds 2000 --alpha 0.1 --pattern "$pat" \
      --pbar 0.1 --pmin 0.02 --alpha-p 0.1 --arch softmax --local-steps 5 --batch 16 --lr 0.1 \
      --eval-every 20 --avg-last 500 --seed "$seed" --no-progress \
      --compare fedavg:uniform,fedavg:all:lr=10,fedau,fedau:K=50 \
      --out "$out/$pat-s$seed" > "$out/$pat-s$seed.txt" 2>&1
    cat "$out/$pat-s$seed.txt"
  done
done
