#!/usr/bin/env bash
# Build or remove the NAT test topology of docs/nat.md in network namespaces
# (root; needs iproute2 and nftables).  The same topology the tests build
# (timtx/test/netns.py).
#
#   examples/nat/topology.sh up [PREFIX] [KIND...]   # KIND: eim (default 1st) or edm (default 2nd)
#   examples/nat/topology.sh down [PREFIX]
#
#                PREFIX-pub  203.0.113.10, 203.0.113.20   public, reachable host
#                     |
#    PREFIX-wan  br0 203.0.113.1                          the "internet": a router
#      | 198.18.1.1                  | 198.18.2.1
#      | 198.18.1.2                  | 198.18.2.2
#    PREFIX-nat1 (eim)            PREFIX-nat2 (edm)        NAT routers
#      | 10.1.0.1                    | 10.2.0.1
#    PREFIX-h1 10.1.0.10          PREFIX-h2 10.2.0.10      NAT'd hosts
#
# eim: endpoint-independent mapping ("masquerade persistent": Linux keeps the
# source port for every destination while it is free).  edm: endpoint-
# dependent ("masquerade random,fully-random": a random port per
# destination).  Both filter by address and port (conntrack).  The router
# between the NATs is why a TTL-2 pre-open dies before the far NAT.
#
# It prints, for each node, its namespace and the address its clients
# connect to.  The node configs beside this script (pub.ini, h1.ini, h2.ini)
# fit it; pub.ini says how to start them, and docs/nat.md what to expect.
set -euo pipefail

action=${1:-}
prefix=${2:-txnat}
shift $(( $# >= 2 ? 2 : $# )) || true
kinds=("$@")
[ ${#kinds[@]} -gt 0 ] || kinds=(eim edm)

rule() {
    case $1 in
        eim) echo "masquerade persistent" ;;
        edm) echo "masquerade random,fully-random" ;;
        *) echo "unknown NAT kind $1 (eim or edm)" >&2; exit 2 ;;
    esac
}

down() {
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^${prefix}-(wan|pub|nat[0-9]+|h[0-9]+)$" || true); do
        ip netns del "$ns"
    done
}

up() {
    local wan=$prefix-wan pub=$prefix-pub
    trap 'down; exit 1' ERR
    for ns in "$wan" "$pub"; do
        ip netns add "$ns"
        ip -n "$ns" link set lo up
    done
    ip netns exec "$wan" sysctl -qw net.ipv4.ip_forward=1
    ip -n "$wan" link add br0 type bridge
    ip -n "$wan" addr add 203.0.113.1/24 dev br0
    ip -n "$wan" link set br0 up
    ip -n "$wan" link add pub type veth peer name eth0 netns "$pub"
    ip -n "$wan" link set pub master br0 up
    ip -n "$pub" addr add 203.0.113.10/24 dev eth0
    ip -n "$pub" addr add 203.0.113.20/24 dev eth0
    ip -n "$pub" link set eth0 up
    ip -n "$pub" route add default via 203.0.113.1
    echo "node pub: namespace $pub, address 203.0.113.10 (and 203.0.113.20), clients at ws://203.0.113.10:5120/tim, config examples/nat/pub.ini (public, reachable)"
    local i=0
    for kind in "${kinds[@]}"; do
        i=$((i + 1))
        local nat=$prefix-nat$i host=$prefix-h$i masq
        masq=$(rule "$kind")
        ip netns add "$nat"; ip -n "$nat" link set lo up
        ip netns add "$host"; ip -n "$host" link set lo up
        ip -n "$wan" link add "n$i" type veth peer name wan netns "$nat"
        ip -n "$wan" addr add "198.18.$i.1/24" dev "n$i"
        ip -n "$wan" link set "n$i" up
        ip netns exec "$nat" sysctl -qw net.ipv4.ip_forward=1
        ip -n "$nat" addr add "198.18.$i.2/24" dev wan
        ip -n "$nat" link set wan up
        ip -n "$nat" route add default via "198.18.$i.1"
        ip -n "$nat" link add lan type veth peer name eth0 netns "$host"
        ip -n "$nat" addr add "10.$i.0.1/24" dev lan
        ip -n "$nat" link set lan up
        ip -n "$host" addr add "10.$i.0.10/24" dev eth0
        ip -n "$host" link set eth0 up
        ip -n "$host" route add default via "10.$i.0.1"
        ip netns exec "$nat" nft add table ip nat
        ip netns exec "$nat" nft "add chain ip nat postrouting { type nat hook postrouting priority srcnat; }"
        ip netns exec "$nat" nft "add rule ip nat postrouting oifname \"wan\" $masq"
        local config="no example config"
        [ -f "$(dirname "$0")/h$i.ini" ] && config="config examples/nat/h$i.ini"
        echo "node h$i: namespace $host, address 10.$i.0.10, clients at ws://10.$i.0.10:5120/tim (from its LAN: ip netns exec $host ...), $config (behind $nat, $kind, public address 198.18.$i.2)"
    done
}

case $action in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down [PREFIX] [eim|edm ...]" >&2; exit 2 ;;
esac
