set -u
export CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 PYTHONUNBUFFERED=1 OPPO_COMMIT=93b8721
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader > $OUT/log.txt
python3 -m pip install -q --no-build-isolation --no-deps -e . > $R/build.log 2>&1; echo "build rc=$? $SECONDS s" >> $OUT/log.txt
timeout 260 python3 bench/ppo_step.py --workload G --modes none,full --delta 64 --warmup 2 --steps 3 --profile --budget-s 240 --out $R/G/ppo_step_G.json > $OUT/ppo_G.txt 2>&1; echo "G rc=$? $SECONDS s" >> $OUT/log.txt
timeout 80 python3 bench/decode_attention.py --ragged --plans v3,v4 --out $R/decode_attention.json > $OUT/decode.txt 2>&1; echo "decode rc=$? $SECONDS s" >> $OUT/log.txt
left=$((560 - SECONDS))
[ $left -gt 60 ] && { timeout $left python3 bench/ppo_step.py --workload G --modes full --delta 64 --keep-stale-kv --warmup 2 --steps 2 --budget-s $((left - 15)) --out $R/keep/ppo_step_G.json > $OUT/ppo_G_keep.txt 2>&1; echo "G keep rc=$? $SECONDS s" >> $OUT/log.txt; }
tar czf $OUT/r.tgz -C $R . ; rm -rf $R
echo "end $SECONDS s" >> $OUT/log.txt
