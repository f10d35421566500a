#!/usr/bin/env bash
# Every GPU measurement the open issues need, in priority order, each bounded so one call of the
# device tool (10 minutes) returns whatever finished. Run from the repository root on the GPU
# machine after installing the wheel bundle (../shared/gpu/wheels.sh liger-kernel==0.8.5):
#   bash benchmarks/gpu_session.sh fold     # the LoRA fold: GPU tests, rank-r kernel sweep, 2048x2 both modes
#   bash benchmarks/gpu_session.sh step     # the fold's second round, issue 3's rope/swiglu sweep, 2048x2 both modes
#   bash benchmarks/gpu_session.sh last     # GPU tests, 2048x2 both modes and 16384x1, all profiled
#   bash benchmarks/gpu_session.sh early    # GPU tests, then 2048x2 both modes (the early forward launch)
#   bash benchmarks/gpu_session.sh gaps     # 2048x2 without checkpointing (step vs replay time), Mistral both modes
#   bash benchmarks/gpu_session.sh final    # issue 6's 16384x1 (profiled) and Mistral rows
#   bash benchmarks/gpu_session.sh graphs   # CUDA-graph replay: its GPU tests, 2048x2 both modes, Mistral
#   bash benchmarks/gpu_session.sh long     # issue 6's 16384x1
#   bash benchmarks/gpu_session.sh e2e      # issue 6: 8B QLoRA, 2048x2 both modes (profiled), 16384x1
#   bash benchmarks/gpu_session.sh more     # issue 6's Mistral shape, the LoRA nodes, host cost per layer
#   bash benchmarks/gpu_session.sh diagnose # the whole-model check on the 8B shape, per pattern set
#   bash benchmarks/gpu_session.sh kernels  # issues 3-5: lora nodes, elementwise, loss, nf4
#   bash benchmarks/gpu_session.sh margin   # GPU tests, issue 3's table with rope's candidates: 15 passes of 30-call graphs
#   bash benchmarks/gpu_session.sh models   # 2048x2 both modes, Mistral both modes
#   bash benchmarks/gpu_session.sh inplace  # GPU tests, issue 3's kernels (rope in place) with their candidates, 2048x2 both modes
# At most 8 files come back from a call: stdout is printed (not kept), profiles stay in the JSON.
set -u
out=${OUT:-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
run() { local name=$1 limit=$2; shift 2; timeout "$limit" "$@" > "$out/$name.txt" 2> "$out/$name.log"; echo "== $name (rc $?)"; cat "$out/$name.txt"; rm -f "$out/$name.txt" "$out"/profile_*.txt; }
(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
 python3 -c "import torch, triton, transformers, peft, bitsandbytes; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__)") > "$out/env.txt" 2>&1
cat "$out/env.txt"
case "${1:-e2e}" in
  fold)  # the LoRA fold (kernels/fold.py) end to end, the rank-r kernel sweep, the GPU tests
    run tests 120 env TRITON_INTERPRET=0 python3 -m pytest -x -q -p no:cacheprovider tests/test_cuda_graphs.py
    run sweep 110 python3 benchmarks/sweep_lowrank.py --out "$out/sweep_lowrank.json"
    run e2e_2048 330 python3 benchmarks/bench_e2e.py --shape llama8b --seq 2048 --batch 2 --variants hf,graft --checkpointing both --timeout 120 --profile "$out" --out "$out/e2e_2048.json"
    ;;
  step)  # the fold's second round (dequant per block, one-launch fills, gradients copied out at once), issue 3's sweep
    run tests 120 env TRITON_INTERPRET=0 python3 -m pytest -x -q -p no:cacheprovider tests/test_cuda_graphs.py
    # (at e5715a7 also: run elementwise 170 python3 benchmarks/bench_elementwise.py --ops rope,swiglu --sweep ...)
    run e2e_2048 300 python3 benchmarks/bench_e2e.py --shape llama8b --seq 2048 --batch 2 --variants hf,graft --checkpointing both --timeout 120 --profile "$out" --out "$out/e2e_2048.json"
    ;;
  last)  # the session's last measurement: GPU tests, 2048x2 both modes and 16384x1 (profiled)
    run tests 90 env TRITON_INTERPRET=0 python3 -m pytest -x -q -p no:cacheprovider tests/test_cuda_graphs.py
    run e2e_2048 270 python3 benchmarks/bench_e2e.py --shape llama8b --seq 2048 --batch 2 --variants hf,graft --checkpointing both --timeout 110 --profile "$out" --out "$out/e2e_2048.json"
    run e2e_16k 240 python3 benchmarks/bench_e2e.py --shape llama8b --seq 16384 --batch 1 --variants hf,graft --checkpointing yes --timeout 150 --verify-tokens 4096 --profile "$out" --out "$out/e2e_16k.json"
    ;;
  early)  # the forward replay launched as the call enters: its GPU tests, then 2048x2 both modes
    run tests 110 env TRITON_INTERPRET=0 python3 -m pytest -x -q -p no:cacheprovider tests/test_cuda_graphs.py
    run e2e_2048 330 python3 benchmarks/bench_e2e.py --shape llama8b --seq 2048 --batch 2 --variants hf,graft --checkpointing both --timeout 120 --out "$out/e2e_2048.json"
    ;;
  gaps)  # where the no-checkpointing step's time beyond its kernels goes; the Mistral rows
    run e2e_2048 200 python3 benchmarks/bench_e2e.py --shape llama8b --seq 2048 --batch 2 --variants hf,graft --checkpointing no --timeout 110 --out "$out/e2e_2048.json"
    run e2e_mistral 300 python3 benchmarks/bench_e2e.py --shape mistral7b --seq 2048 --batch 2 --variants hf,graft --checkpointing both --timeout 100 --out "$out/e2e_mistral.json"
    ;;
  final)  # issue 6's 16384x1 and Mistral rows after the fold
    run e2e_16k 330 python3 benchmarks/bench_e2e.py --shape llama8b --seq 16384 --batch 1 --variants hf,graft --checkpointing yes --timeout 160 --verify-tokens 4096 --profile "$out" --out "$out/e2e_16k.json"
    run e2e_mistral 170 python3 benchmarks/bench_e2e.py --shape mistral7b --seq 2048 --batch 2 --variants hf,graft --checkpointing yes --timeout 100 --out "$out/e2e_mistral.json"
    ;;
  graphs)  # CUDA-graph replay: its GPU tests (compiled kernels, not the interpreter), 2048x2, Mistral
    run tests 100 env TRITON_INTERPRET=0 python3 -m pytest -x -q -p no:cacheprovider tests/test_cuda_graphs.py
    run e2e_2048 330 python3 benchmarks/bench_e2e.py --shape llama8b --seq 2048 --batch 2 --variants hf,graft --checkpointing both --timeout 120 --profile "$out" --out "$out/e2e_2048.json"
    run e2e_mistral 160 python3 benchmarks/bench_e2e.py --shape mistral7b --seq 2048 --batch 2 --variants hf,graft --checkpointing yes --timeout 100 --out "$out/e2e_mistral.json"
    ;;
  inplace)  # rope in place where the graph proves it: GPU tests, the elementwise table with candidates, the step both modes
    run tests 100 env TRITON_INTERPRET=0 python3 -m pytest -x -q -p no:cacheprovider tests/test_cuda_graphs.py
    run elementwise 150 python3 benchmarks/bench_elementwise.py --candidates --passes 7 --out "$out/elementwise.json"
    run e2e_2048 320 python3 benchmarks/bench_e2e.py --shape llama8b --seq 2048 --batch 2 --variants hf,graft --checkpointing both --timeout 115 --out "$out/e2e_2048.json"
    ;;
  margin)  # rope: loads first, one token per program in backward; the GPU tests first
    run tests 100 env TRITON_INTERPRET=0 python3 -m pytest -x -q -p no:cacheprovider tests/test_cuda_graphs.py
    run elementwise 400 python3 benchmarks/bench_elementwise.py --candidates --passes 15 --calls 30 --out "$out/elementwise.json"
    ;;
  models)  # the step after a kernel change: Llama-8B 2048x2 and Mistral-7B 2048x2, both modes
    run e2e_2048 270 python3 benchmarks/bench_e2e.py --shape llama8b --seq 2048 --batch 2 --variants hf,graft --checkpointing both --timeout 110 --out "$out/e2e_2048.json"
    run e2e_mistral 270 python3 benchmarks/bench_e2e.py --shape mistral7b --seq 2048 --batch 2 --variants hf,graft --checkpointing both --timeout 110 --out "$out/e2e_mistral.json"
    ;;
  long)
    run e2e_16k 330 python3 benchmarks/bench_e2e.py --shape llama8b --seq 16384 --batch 1 --variants hf,graft --checkpointing yes --timeout 160 --verify-tokens 4096 --profile "$out" --out "$out/e2e_16k.json"
    ;;
  e2e)
    run e2e_2048 360 python3 benchmarks/bench_e2e.py --shape llama8b --seq 2048 --batch 2 --variants hf,graft --checkpointing both --timeout 170 --profile "$out" --out "$out/e2e_2048.json"
    run e2e_16k 220 python3 benchmarks/bench_e2e.py --shape llama8b --seq 16384 --batch 1 --variants hf,graft --checkpointing yes --timeout 150 --verify-tokens 4096 --out "$out/e2e_16k.json"
    ;;
  more)  # the Mistral shape, the LoRA nodes (split-K lowrank), then the host's cost per layer
    run e2e_mistral 190 python3 benchmarks/bench_e2e.py --shape mistral7b --seq 2048 --batch 2 --variants hf,graft --checkpointing yes --timeout 120 --out "$out/e2e_mistral.json"
    run lora 120 python3 benchmarks/bench_lora.py --out "$out/lora.json"
    run host 150 python3 benchmarks/bench_e2e.py --shape llama8b --layers 4 --seq 64 --batch 1 --steps 8 --variants hf,graft --checkpointing no --timeout 70 --profile "$out" --out "$out/host.json"
    ;;
  diagnose)  # the whole-model check on the 8B shape: the captured graph alone, then every pattern
    run diagnose 330 python3 benchmarks/diagnose_verify.py --sdpa --layers 32 --sets none,all
    ;;
  kernels)
    run lora 120 python3 benchmarks/bench_lora.py --out "$out/lora.json"
    run elementwise 170 python3 benchmarks/bench_elementwise.py --candidates --out "$out/elementwise.json"
    run loss 240 python3 benchmarks/bench_loss.py --out "$out/loss.json"
    run nf4 90 python3 benchmarks/bench_nf4.py --out "$out/nf4.json"
    ;;
esac
