# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_gkm_member_global_optspecs
    string join \n log-format= h/help V/version
end

function __fish_gkm_member_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_gkm_member_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_gkm_member_using_subcommand
    set -l cmd (__fish_gkm_member_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c gkm-member -n "__fish_gkm_member_needs_command" -l log-format -d 'Log format on standard error: `text` for people, `json` (one object a line) for a log pipeline (before or after the command)' -r -f -a "text\t'Human-readable lines (the default)'
json\t'One JSON object a line (timestamp, level, target, fields), for a log pipeline'"
complete -c gkm-member -n "__fish_gkm_member_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c gkm-member -n "__fish_gkm_member_needs_command" -s V -l version -d 'Print version'
complete -c gkm-member -n "__fish_gkm_member_needs_command" -f -a "init" -d 'Create the state directory with a new identity key, HPKE key and storage key'
complete -c gkm-member -n "__fish_gkm_member_needs_command" -f -a "run" -d 'Run the member: register, follow rekeys, serve the local API'
complete -c gkm-member -n "__fish_gkm_member_needs_command" -f -a "rotate-storage-key" -d 'Re-seal the membership file under a new storage key and destroy the old key (DIR/storage.key). Run it with the member stopped; a rotation cut short is finished or rolled back by the next `rotate-storage-key` or `run`'
complete -c gkm-member -n "__fish_gkm_member_needs_command" -f -a "send" -d 'Encrypt MESSAGE under the send key and multicast it. The member hands out the sender id (its leaf) and a sequence number no other sender of it ever got'
complete -c gkm-member -n "__fish_gkm_member_needs_command" -f -a "recv" -d 'Print each fresh, authentic message of the group on a line, under the keys the member accepts (followed as they change)'
complete -c gkm-member -n "__fish_gkm_member_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c gkm-member -n "__fish_gkm_member_using_subcommand init" -l state-dir -d 'The state directory' -r -F
complete -c gkm-member -n "__fish_gkm_member_using_subcommand init" -l kem -d 'The KEM of the HPKE key to make (see `run --kem`)' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand init" -l log-format -d 'Log format on standard error: `text` for people, `json` (one object a line) for a log pipeline (before or after the command)' -r -f -a "text\t'Human-readable lines (the default)'
json\t'One JSON object a line (timestamp, level, target, fields), for a log pipeline'"
complete -c gkm-member -n "__fish_gkm_member_using_subcommand init" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c gkm-member -n "__fish_gkm_member_using_subcommand run" -l controller -d 'A controller\'s TCP (and fan-out UDP) address, HOST:PORT. Repeat it for each controller of a highly available group: the member asks the first; a controller that does not lead the group names the leader, which the member asks when it is one of these (else the next one); a controller that does not answer is passed over for the next. All must share the key given as --controller-key. The member keeps its membership and keys throughout' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand run" -l group -d 'The group\'s name' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand run" -l controller-key -d 'The controller\'s Ed25519 public key, 64 hex digits' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand run" -l state-dir -d 'The state directory (created with new keys if missing)' -r -F
complete -c gkm-member -n "__fish_gkm_member_using_subcommand run" -l kem -d 'The KEM of the HPKE key the controller seals this member\'s keys to: x-wing (ML-KEM-768 + X25519; a welcome recorded today stays closed to a quantum computer later) or x25519 (for constrained members; the group\'s policy must accept it). The key is made in the state directory when missing; a membership made with the other KEM\'s key registers again' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand run" -l multicast -d 'The group\'s rekey multicast address. By default the one the controller names in its welcome (239.255.77.1:47701 until then); given, it is kept whatever the controller says (a relay\'s address, say). A wrong one hears no rekey of the group, and the member falls back to fan-out' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand run" -l api-socket -d 'The local API socket (default: STATE_DIR/api.sock)' -r -F
complete -c gkm-member -n "__fish_gkm_member_using_subcommand run" -l token-file -d 'A file holding an enrollment token (its first line; mode 0600, like a key): a token is a secret, and `ps` shows command lines' -r -F
complete -c gkm-member -n "__fish_gkm_member_using_subcommand run" -l interface -d 'IPv4 interface address for multicast' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand run" -l interface-v6 -d 'IPv6 interface index for multicast (0: the kernel chooses)' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand run" -l renew-ms -d 'Lease renewal period in milliseconds (default 20000)' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand run" -l fanout-after-ms -d 'When no rekey or heartbeat arrives for this many milliseconds: on multicast, switch to unicast fan-out (a network that silently drops multicast); on fan-out, ask the controller for the current keys over TCP. 0: never' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand run" -l save-after-ms -d 'Key changes are written to the membership file this many to twice as many milliseconds after they happen, many changes in one write (a new membership is written at once). A restarted member resyncs at once, so an older file costs nothing; fewer writes spare flash storage, and agents sharing a host do not write in step. At most a day' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand run" -l activation-ms -d 'After a rekey, applications keep sending under the previous key for this many milliseconds (RFC 9838\'s activation delay), so that receivers whose member gets the new key a little later already hold it. At most 60000' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand run" -l deactivation-ms -d 'After a rekey, receivers accept frames under the previous key for this many milliseconds, then refuse them (RFC 9838\'s deactivation delay): how long a member evicted by the rekey can still inject frames. Longer than --activation-ms; at most 600000' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand run" -l log-format -d 'Log format on standard error: `text` for people, `json` (one object a line) for a log pipeline (before or after the command)' -r -f -a "text\t'Human-readable lines (the default)'
json\t'One JSON object a line (timestamp, level, target, fields), for a log pipeline'"
complete -c gkm-member -n "__fish_gkm_member_using_subcommand run" -l no-multicast -d 'Do not join the multicast group; ask the controller for fan-out'
complete -c gkm-member -n "__fish_gkm_member_using_subcommand run" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c gkm-member -n "__fish_gkm_member_using_subcommand rotate-storage-key" -l state-dir -d 'The state directory' -r -F
complete -c gkm-member -n "__fish_gkm_member_using_subcommand rotate-storage-key" -l api-socket -d 'The member\'s local API socket, checked to be silent (default: STATE_DIR/api.sock)' -r -F
complete -c gkm-member -n "__fish_gkm_member_using_subcommand rotate-storage-key" -l log-format -d 'Log format on standard error: `text` for people, `json` (one object a line) for a log pipeline (before or after the command)' -r -f -a "text\t'Human-readable lines (the default)'
json\t'One JSON object a line (timestamp, level, target, fields), for a log pipeline'"
complete -c gkm-member -n "__fish_gkm_member_using_subcommand rotate-storage-key" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c gkm-member -n "__fish_gkm_member_using_subcommand send" -l api-socket -d 'The member\'s local API socket' -r -F
complete -c gkm-member -n "__fish_gkm_member_using_subcommand send" -l data -d 'The data multicast group' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand send" -l interface -d 'IPv4 interface address for multicast' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand send" -l interface-v6 -d 'IPv6 interface index for multicast (0: the kernel chooses)' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand send" -l log-format -d 'Log format on standard error: `text` for people, `json` (one object a line) for a log pipeline (before or after the command)' -r -f -a "text\t'Human-readable lines (the default)'
json\t'One JSON object a line (timestamp, level, target, fields), for a log pipeline'"
complete -c gkm-member -n "__fish_gkm_member_using_subcommand send" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c gkm-member -n "__fish_gkm_member_using_subcommand recv" -l api-socket -d 'The member\'s local API socket' -r -F
complete -c gkm-member -n "__fish_gkm_member_using_subcommand recv" -l data -d 'The data multicast group' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand recv" -l interface -d 'IPv4 interface address for multicast' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand recv" -l interface-v6 -d 'IPv6 interface index for multicast (0: the kernel chooses)' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand recv" -l count -d 'Stop after this many messages (exit 1 if the timeout comes first)' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand recv" -l timeout-ms -d 'Stop after this many milliseconds' -r
complete -c gkm-member -n "__fish_gkm_member_using_subcommand recv" -l log-format -d 'Log format on standard error: `text` for people, `json` (one object a line) for a log pipeline (before or after the command)' -r -f -a "text\t'Human-readable lines (the default)'
json\t'One JSON object a line (timestamp, level, target, fields), for a log pipeline'"
complete -c gkm-member -n "__fish_gkm_member_using_subcommand recv" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c gkm-member -n "__fish_gkm_member_using_subcommand help; and not __fish_seen_subcommand_from init run rotate-storage-key send recv help" -f -a "init" -d 'Create the state directory with a new identity key, HPKE key and storage key'
complete -c gkm-member -n "__fish_gkm_member_using_subcommand help; and not __fish_seen_subcommand_from init run rotate-storage-key send recv help" -f -a "run" -d 'Run the member: register, follow rekeys, serve the local API'
complete -c gkm-member -n "__fish_gkm_member_using_subcommand help; and not __fish_seen_subcommand_from init run rotate-storage-key send recv help" -f -a "rotate-storage-key" -d 'Re-seal the membership file under a new storage key and destroy the old key (DIR/storage.key). Run it with the member stopped; a rotation cut short is finished or rolled back by the next `rotate-storage-key` or `run`'
complete -c gkm-member -n "__fish_gkm_member_using_subcommand help; and not __fish_seen_subcommand_from init run rotate-storage-key send recv help" -f -a "send" -d 'Encrypt MESSAGE under the send key and multicast it. The member hands out the sender id (its leaf) and a sequence number no other sender of it ever got'
complete -c gkm-member -n "__fish_gkm_member_using_subcommand help; and not __fish_seen_subcommand_from init run rotate-storage-key send recv help" -f -a "recv" -d 'Print each fresh, authentic message of the group on a line, under the keys the member accepts (followed as they change)'
complete -c gkm-member -n "__fish_gkm_member_using_subcommand help; and not __fish_seen_subcommand_from init run rotate-storage-key send recv help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
