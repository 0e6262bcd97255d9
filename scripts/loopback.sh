# Sourced by the scripts that start a Ray head (the farm tests and benchmarks): a Ray head
# binds every network interface, so they run in a network namespace of their own whose only
# interface is loopback (root, or unprivileged user namespaces, needed).
#
#   in_loopback CMD...   runs CMD there. Where no namespace can be made: with
#                        LOOPBACK_FALLBACK=isolated (the GPU machine, which reaches nothing
#                        outside itself) CMD runs on the host with FXOFFLOAD_ISOLATED_HOST=1;
#                        otherwise it runs as is, and the farm tests skip and say why.
in_loopback() {
    if command -v ip >/dev/null; then
        local prefix
        for prefix in "unshare --net --" "unshare --net --map-root-user --"; do
            if $prefix true 2>/dev/null; then
                $prefix sh -c 'ip link set lo up && exec "$@"' sh "$@"
                return
            fi
        done
    else
        echo "loopback: no 'ip' command (iproute2)" >&2
    fi
    if [[ "${LOOPBACK_FALLBACK:-}" == isolated ]]; then
        echo "loopback: no network namespace here (unshare refused): this machine reaches" \
             "nothing outside it, FXOFFLOAD_ISOLATED_HOST=1" >&2
        FXOFFLOAD_ISOLATED_HOST=1 "$@"
        return
    fi
    echo "loopback: no network namespace here (unshare refused): the farm tests will not run" >&2
    "$@"
}
