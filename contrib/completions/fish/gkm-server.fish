# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_gkm_server_global_optspecs
    string join \n log-format= h/help V/version
end

function __fish_gkm_server_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_gkm_server_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_gkm_server_using_subcommand
    set -l cmd (__fish_gkm_server_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c gkm-server -n "__fish_gkm_server_needs_command" -l log-format -d 'Log format on standard error: `text` for people, `json` (one object a line) for a log pipeline (before or after the command)' -r -f -a "text\t'Human-readable lines (the default)'
json\t'One JSON object a line (timestamp, level, target, fields), for a log pipeline'"
complete -c gkm-server -n "__fish_gkm_server_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c gkm-server -n "__fish_gkm_server_needs_command" -s V -l version -d 'Print version'
complete -c gkm-server -n "__fish_gkm_server_needs_command" -f -a "init" -d 'Create the state directory, the controller and storage keys and a default config'
complete -c gkm-server -n "__fish_gkm_server_needs_command" -f -a "run" -d 'Serve (runs `init` first when the controller key is missing)'
complete -c gkm-server -n "__fish_gkm_server_needs_command" -f -a "rotate-storage-key" -d 'Re-seal the stored state under a new storage key and destroy the old key (crypto-shredding: copies of the state sealed under the old key can no longer be opened). Run it with the daemon stopped (every controller, with PostgreSQL). Crash-safe: a rotation cut short is finished or rolled back by the next `rotate-storage-key` or `run`'
complete -c gkm-server -n "__fish_gkm_server_needs_command" -f -a "check-config" -d 'Check a config and print what `run` would serve with it; exits 1 if it would not start'
complete -c gkm-server -n "__fish_gkm_server_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c gkm-server -n "__fish_gkm_server_using_subcommand init" -l state-dir -d 'State directory' -r -F
complete -c gkm-server -n "__fish_gkm_server_using_subcommand init" -l storage-key-file -d 'Keep the storage key in this file (made if missing) instead of the state directory' -r -F
complete -c gkm-server -n "__fish_gkm_server_using_subcommand init" -l log-format -d 'Log format on standard error: `text` for people, `json` (one object a line) for a log pipeline (before or after the command)' -r -f -a "text\t'Human-readable lines (the default)'
json\t'One JSON object a line (timestamp, level, target, fields), for a log pipeline'"
complete -c gkm-server -n "__fish_gkm_server_using_subcommand init" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c gkm-server -n "__fish_gkm_server_using_subcommand run" -l config -d 'Config file (TOML); without it, STATE_DIR/gkm-server.toml (the one `init` writes), or the defaults when that file does not exist' -r -F
complete -c gkm-server -n "__fish_gkm_server_using_subcommand run" -l state-dir -d 'State directory' -r -F
complete -c gkm-server -n "__fish_gkm_server_using_subcommand run" -l storage-key-file -d 'The storage key\'s file, if not in the state directory. Also: GKM_STORAGE_KEY (64 hex digits) or $CREDENTIALS_DIRECTORY/storage.key (systemd LoadCredential=)' -r -F
complete -c gkm-server -n "__fish_gkm_server_using_subcommand run" -l control-socket -d 'The control socket gkmctl talks to (default: STATE_DIR/control.sock); under systemd, in the service\'s runtime directory' -r -F
complete -c gkm-server -n "__fish_gkm_server_using_subcommand run" -l log-format -d 'Log format on standard error: `text` for people, `json` (one object a line) for a log pipeline (before or after the command)' -r -f -a "text\t'Human-readable lines (the default)'
json\t'One JSON object a line (timestamp, level, target, fields), for a log pipeline'"
complete -c gkm-server -n "__fish_gkm_server_using_subcommand run" -l allow-rollback -d 'Serve a state file older than this controller\'s epoch floor (a restored backup), resetting each such group first: every member is excluded and registers again'
complete -c gkm-server -n "__fish_gkm_server_using_subcommand run" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c gkm-server -n "__fish_gkm_server_using_subcommand rotate-storage-key" -l config -d 'Config file (TOML), to find the store ([storage]); without it, STATE_DIR/gkm-server.toml, as `run` reads' -r -F
complete -c gkm-server -n "__fish_gkm_server_using_subcommand rotate-storage-key" -l state-dir -d 'State directory' -r -F
complete -c gkm-server -n "__fish_gkm_server_using_subcommand rotate-storage-key" -l storage-key-file -d 'The storage key\'s file, if not in the state directory (replaced in place)' -r -F
complete -c gkm-server -n "__fish_gkm_server_using_subcommand rotate-storage-key" -l new-key-file -d 'Write the new key to this new file (mode 0600) and leave the old key where it is, for the operator to move the new key into place: needed when the key comes from GKM_STORAGE_KEY or a systemd credential, which gkm-server does not write' -r -F
complete -c gkm-server -n "__fish_gkm_server_using_subcommand rotate-storage-key" -l log-format -d 'Log format on standard error: `text` for people, `json` (one object a line) for a log pipeline (before or after the command)' -r -f -a "text\t'Human-readable lines (the default)'
json\t'One JSON object a line (timestamp, level, target, fields), for a log pipeline'"
complete -c gkm-server -n "__fish_gkm_server_using_subcommand rotate-storage-key" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c gkm-server -n "__fish_gkm_server_using_subcommand check-config" -l config -d 'Config file (TOML); without it, STATE_DIR/gkm-server.toml, as `run` reads' -r -F
complete -c gkm-server -n "__fish_gkm_server_using_subcommand check-config" -l state-dir -d 'State directory' -r -F
complete -c gkm-server -n "__fish_gkm_server_using_subcommand check-config" -l log-format -d 'Log format on standard error: `text` for people, `json` (one object a line) for a log pipeline (before or after the command)' -r -f -a "text\t'Human-readable lines (the default)'
json\t'One JSON object a line (timestamp, level, target, fields), for a log pipeline'"
complete -c gkm-server -n "__fish_gkm_server_using_subcommand check-config" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c gkm-server -n "__fish_gkm_server_using_subcommand help; and not __fish_seen_subcommand_from init run rotate-storage-key check-config help" -f -a "init" -d 'Create the state directory, the controller and storage keys and a default config'
complete -c gkm-server -n "__fish_gkm_server_using_subcommand help; and not __fish_seen_subcommand_from init run rotate-storage-key check-config help" -f -a "run" -d 'Serve (runs `init` first when the controller key is missing)'
complete -c gkm-server -n "__fish_gkm_server_using_subcommand help; and not __fish_seen_subcommand_from init run rotate-storage-key check-config help" -f -a "rotate-storage-key" -d 'Re-seal the stored state under a new storage key and destroy the old key (crypto-shredding: copies of the state sealed under the old key can no longer be opened). Run it with the daemon stopped (every controller, with PostgreSQL). Crash-safe: a rotation cut short is finished or rolled back by the next `rotate-storage-key` or `run`'
complete -c gkm-server -n "__fish_gkm_server_using_subcommand help; and not __fish_seen_subcommand_from init run rotate-storage-key check-config help" -f -a "check-config" -d 'Check a config and print what `run` would serve with it; exits 1 if it would not start'
complete -c gkm-server -n "__fish_gkm_server_using_subcommand help; and not __fish_seen_subcommand_from init run rotate-storage-key check-config help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
