# Helpers shared by the benchmark scripts.

# need COMMAND PACKAGE: installs PACKAGE from Debian's archive when COMMAND is missing.
need() {
    command -v "$1" >/dev/null || { apt-get update -q && apt-get install -y -q "$2"; }
}
