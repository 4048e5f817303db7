#!/usr/bin/env bash
# Entrypoint of the nsa-dist image (runs under tini, which forwards signals and reaps children).
#   (no arguments)  print how to launch and exit
#   sshd            run this container's sshd for multi-node launches over ssh (see docker/README.md):
#                   NSA_SSHD_LISTEN (required) names the private address to listen on; the port is the image's
#                   (2222 by default); the host key is generated on first start; keys come from mounted files
#   anything else   exec'd as given, so the command itself receives the signals tini forwards
set -euo pipefail

usage() {
    cat <<'USAGE'
nsa-dist GPU image. Run a command, from /workspace (configs/, examples/, benchmarks/, tests/):
  deepspeed --num_gpus 8 --module nsa_dist.train --config configs/train/gpt-1b-128k-cp8.yaml
  torchrun --nproc-per-node 2 -m nsa_dist.train --config configs/train/gpt-1b-128k-cp2.yaml
  mpirun -np 8 python -m nsa_dist.train --config configs/train/gpt-1b-128k-cp8.yaml
  GPUS_PER_NODE=2 CP=2 SEQ_LEN=131072 bash examples/megatron/pretrain_gpt_nsa.sh
  nsa-dist train --config configs/train/small-gpu-32k.yaml
  sshd                     (with NSA_SSHD_LISTEN=<private address>: for deepspeed --hostfile / mpirun over ssh)
Ray: bind the head to 127.0.0.1 or a private interface you name; never 0.0.0.0 (no authentication).
Docs: docker/README.md in the nsa-dist repository.
USAGE
}

run_sshd() {
    if [[ -z "${NSA_SSHD_LISTEN:-}" ]]; then
        echo "entrypoint: sshd needs NSA_SSHD_LISTEN=<private address of this node> (it never listens on all interfaces)" >&2
        exit 2
    fi
    local key="$HOME/.ssh/ssh_host_ed25519_key"
    if [[ ! -f "$key" ]]; then
        ssh-keygen -q -t ed25519 -N "" -f "$key"
    fi
    exec /usr/sbin/sshd -D -e -f /etc/nsa-dist/sshd_config -o "ListenAddress=${NSA_SSHD_LISTEN}"
}

if [[ $# -eq 0 ]]; then
    usage
    exit 0
fi
if [[ "$1" == "sshd" ]]; then
    run_sshd
fi
exec "$@"
