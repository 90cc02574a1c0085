complete -c gkm-demo -l members -d 'How many member agents to start' -r
complete -c gkm-demo -l evict-latency -d 'Instead of the churn run: measure ROUNDS times the time from an eviction command to the last member holding the new key, and print the median and 99th percentile' -r
complete -c gkm-demo -l postgres -d 'Keep the controller\'s state in PostgreSQL (a connection string such as `host=/tmp/pg user=gkm dbname=gkm`, without quotes, backslashes or line breaks) instead of its redb file; give it an empty database' -r
complete -c gkm-demo -s h -l help -d 'Print help (see more with \'--help\')'
complete -c gkm-demo -s V -l version -d 'Print version'
