# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_gkmctl_global_optspecs
    string join \n socket= json h/help V/version
end

function __fish_gkmctl_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_gkmctl_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_gkmctl_using_subcommand
    set -l cmd (__fish_gkmctl_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c gkmctl -n "__fish_gkmctl_needs_command" -l socket -d 'The daemon\'s control socket (before or after the command)' -r -F
complete -c gkmctl -n "__fish_gkmctl_needs_command" -l json -d 'Print the raw JSON data (before or after the command)'
complete -c gkmctl -n "__fish_gkmctl_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c gkmctl -n "__fish_gkmctl_needs_command" -s V -l version -d 'Print version'
complete -c gkmctl -n "__fish_gkmctl_needs_command" -f -a "status" -d 'The controller in brief'
complete -c gkmctl -n "__fish_gkmctl_needs_command" -f -a "groups" -d 'Every group'
complete -c gkmctl -n "__fish_gkmctl_needs_command" -f -a "members" -d 'A group\'s members'
complete -c gkmctl -n "__fish_gkmctl_needs_command" -f -a "evict" -d 'End a membership now (the group is rekeyed)'
complete -c gkmctl -n "__fish_gkmctl_needs_command" -f -a "ban" -d 'Keep an identity out of a group under every enrollment mode, across restarts (a current member with it is evicted)'
complete -c gkmctl -n "__fish_gkmctl_needs_command" -f -a "unban" -d 'Lift a ban'
complete -c gkmctl -n "__fish_gkmctl_needs_command" -f -a "bans" -d 'A group\'s banned identities'
complete -c gkmctl -n "__fish_gkmctl_needs_command" -f -a "signing-key" -d 'The group\'s signing key (`gkmctl status` shows each group\'s key number and age)'
complete -c gkmctl -n "__fish_gkmctl_needs_command" -f -a "rekey" -d 'Rekey a group now'
complete -c gkmctl -n "__fish_gkmctl_needs_command" -f -a "policy" -d 'Show a group\'s policy, or change one setting'
complete -c gkmctl -n "__fish_gkmctl_needs_command" -f -a "keys" -d 'A group\'s key inventory (never key material)'
complete -c gkmctl -n "__fish_gkmctl_needs_command" -f -a "tree" -d 'A group\'s tree'
complete -c gkmctl -n "__fish_gkmctl_needs_command" -f -a "stats" -d 'A group\'s counters'
complete -c gkmctl -n "__fish_gkmctl_needs_command" -f -a "reset" -d 'Exclude every member of a group at once, for a controller host suspected compromised: every key is new and no one holds one; members register again (and are authorized again) after a random delay'
complete -c gkmctl -n "__fish_gkmctl_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand status" -l socket -d 'The daemon\'s control socket (before or after the command)' -r -F
complete -c gkmctl -n "__fish_gkmctl_using_subcommand status" -l json -d 'Print the raw JSON data (before or after the command)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand status" -s h -l help -d 'Print help'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand groups" -l socket -d 'The daemon\'s control socket (before or after the command)' -r -F
complete -c gkmctl -n "__fish_gkmctl_using_subcommand groups" -l json -d 'Print the raw JSON data (before or after the command)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand groups" -s h -l help -d 'Print help'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand members" -l socket -d 'The daemon\'s control socket (before or after the command)' -r -F
complete -c gkmctl -n "__fish_gkmctl_using_subcommand members" -l json -d 'Print the raw JSON data (before or after the command)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand members" -s h -l help -d 'Print help'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand evict" -l socket -d 'The daemon\'s control socket (before or after the command)' -r -F
complete -c gkmctl -n "__fish_gkmctl_using_subcommand evict" -l ban -d 'Also ban its identity: it cannot register again, across restarts, until `unban`'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand evict" -l json -d 'Print the raw JSON data (before or after the command)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand evict" -s h -l help -d 'Print help'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand ban" -l socket -d 'The daemon\'s control socket (before or after the command)' -r -F
complete -c gkmctl -n "__fish_gkmctl_using_subcommand ban" -l json -d 'Print the raw JSON data (before or after the command)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand ban" -s h -l help -d 'Print help'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand unban" -l socket -d 'The daemon\'s control socket (before or after the command)' -r -F
complete -c gkmctl -n "__fish_gkmctl_using_subcommand unban" -l json -d 'Print the raw JSON data (before or after the command)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand unban" -s h -l help -d 'Print help'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand bans" -l socket -d 'The daemon\'s control socket (before or after the command)' -r -F
complete -c gkmctl -n "__fish_gkmctl_using_subcommand bans" -l json -d 'Print the raw JSON data (before or after the command)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand bans" -s h -l help -d 'Print help'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand signing-key; and not __fish_seen_subcommand_from rotate help" -l socket -d 'The daemon\'s control socket (before or after the command)' -r -F
complete -c gkmctl -n "__fish_gkmctl_using_subcommand signing-key; and not __fish_seen_subcommand_from rotate help" -l json -d 'Print the raw JSON data (before or after the command)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand signing-key; and not __fish_seen_subcommand_from rotate help" -s h -l help -d 'Print help'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand signing-key; and not __fish_seen_subcommand_from rotate help" -f -a "rotate" -d 'Replace the group\'s signing key: a new key is made and announced to the group, signed by the current one, and signs from the rekey that goes out with it; members switch, and the old key is accepted for older epochs for a grace of 16 epochs'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand signing-key; and not __fish_seen_subcommand_from rotate help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand signing-key; and __fish_seen_subcommand_from rotate" -l socket -d 'The daemon\'s control socket (before or after the command)' -r -F
complete -c gkmctl -n "__fish_gkmctl_using_subcommand signing-key; and __fish_seen_subcommand_from rotate" -l json -d 'Print the raw JSON data (before or after the command)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand signing-key; and __fish_seen_subcommand_from rotate" -s h -l help -d 'Print help'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand signing-key; and __fish_seen_subcommand_from help" -f -a "rotate" -d 'Replace the group\'s signing key: a new key is made and announced to the group, signed by the current one, and signs from the rekey that goes out with it; members switch, and the old key is accepted for older epochs for a grace of 16 epochs'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand signing-key; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand rekey" -l socket -d 'The daemon\'s control socket (before or after the command)' -r -F
complete -c gkmctl -n "__fish_gkmctl_using_subcommand rekey" -l json -d 'Print the raw JSON data (before or after the command)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand rekey" -s h -l help -d 'Print help'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand policy" -l set -d '`key=value`' -r
complete -c gkmctl -n "__fish_gkmctl_using_subcommand policy" -l socket -d 'The daemon\'s control socket (before or after the command)' -r -F
complete -c gkmctl -n "__fish_gkmctl_using_subcommand policy" -l json -d 'Print the raw JSON data (before or after the command)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand policy" -s h -l help -d 'Print help'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand keys" -l socket -d 'The daemon\'s control socket (before or after the command)' -r -F
complete -c gkmctl -n "__fish_gkmctl_using_subcommand keys" -l json -d 'Print the raw JSON data (before or after the command)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand keys" -s h -l help -d 'Print help'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand tree" -l socket -d 'The daemon\'s control socket (before or after the command)' -r -F
complete -c gkmctl -n "__fish_gkmctl_using_subcommand tree" -l dot -d 'Print Graphviz DOT (the only format so far)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand tree" -l json -d 'Print the raw JSON data (before or after the command)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand tree" -s h -l help -d 'Print help'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand stats" -l socket -d 'The daemon\'s control socket (before or after the command)' -r -F
complete -c gkmctl -n "__fish_gkmctl_using_subcommand stats" -l json -d 'Print the raw JSON data (before or after the command)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand stats" -s h -l help -d 'Print help'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand reset" -l socket -d 'The daemon\'s control socket (before or after the command)' -r -F
complete -c gkmctl -n "__fish_gkmctl_using_subcommand reset" -l yes -d 'Confirm: every member loses the group key until it registers again'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand reset" -l json -d 'Print the raw JSON data (before or after the command)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand reset" -s h -l help -d 'Print help'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand help; and not __fish_seen_subcommand_from status groups members evict ban unban bans signing-key rekey policy keys tree stats reset help" -f -a "status" -d 'The controller in brief'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand help; and not __fish_seen_subcommand_from status groups members evict ban unban bans signing-key rekey policy keys tree stats reset help" -f -a "groups" -d 'Every group'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand help; and not __fish_seen_subcommand_from status groups members evict ban unban bans signing-key rekey policy keys tree stats reset help" -f -a "members" -d 'A group\'s members'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand help; and not __fish_seen_subcommand_from status groups members evict ban unban bans signing-key rekey policy keys tree stats reset help" -f -a "evict" -d 'End a membership now (the group is rekeyed)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand help; and not __fish_seen_subcommand_from status groups members evict ban unban bans signing-key rekey policy keys tree stats reset help" -f -a "ban" -d 'Keep an identity out of a group under every enrollment mode, across restarts (a current member with it is evicted)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand help; and not __fish_seen_subcommand_from status groups members evict ban unban bans signing-key rekey policy keys tree stats reset help" -f -a "unban" -d 'Lift a ban'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand help; and not __fish_seen_subcommand_from status groups members evict ban unban bans signing-key rekey policy keys tree stats reset help" -f -a "bans" -d 'A group\'s banned identities'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand help; and not __fish_seen_subcommand_from status groups members evict ban unban bans signing-key rekey policy keys tree stats reset help" -f -a "signing-key" -d 'The group\'s signing key (`gkmctl status` shows each group\'s key number and age)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand help; and not __fish_seen_subcommand_from status groups members evict ban unban bans signing-key rekey policy keys tree stats reset help" -f -a "rekey" -d 'Rekey a group now'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand help; and not __fish_seen_subcommand_from status groups members evict ban unban bans signing-key rekey policy keys tree stats reset help" -f -a "policy" -d 'Show a group\'s policy, or change one setting'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand help; and not __fish_seen_subcommand_from status groups members evict ban unban bans signing-key rekey policy keys tree stats reset help" -f -a "keys" -d 'A group\'s key inventory (never key material)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand help; and not __fish_seen_subcommand_from status groups members evict ban unban bans signing-key rekey policy keys tree stats reset help" -f -a "tree" -d 'A group\'s tree'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand help; and not __fish_seen_subcommand_from status groups members evict ban unban bans signing-key rekey policy keys tree stats reset help" -f -a "stats" -d 'A group\'s counters'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand help; and not __fish_seen_subcommand_from status groups members evict ban unban bans signing-key rekey policy keys tree stats reset help" -f -a "reset" -d 'Exclude every member of a group at once, for a controller host suspected compromised: every key is new and no one holds one; members register again (and are authorized again) after a random delay'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand help; and not __fish_seen_subcommand_from status groups members evict ban unban bans signing-key rekey policy keys tree stats reset help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c gkmctl -n "__fish_gkmctl_using_subcommand help; and __fish_seen_subcommand_from signing-key" -f -a "rotate" -d 'Replace the group\'s signing key: a new key is made and announced to the group, signed by the current one, and signs from the rekey that goes out with it; members switch, and the old key is accepted for older epochs for a grace of 16 epochs'
