//! Seeded mutations of valid goss files through the whole parser and every matcher: no input
//! may panic (the cargo-fuzz target in `fuzz/` does the same without end).

const SEEDS: &[&str] = &[
    include_str!("../../../examples/hello/checks.yaml"),
    "file:\n  /etc/passwd:\n    exists: true\n    contents: [root, \"/^root:x/\", \"!nope\"]\nuser:\n  root:\n    uid: {lt: 1}\n    groups: {consist-of: [root, {have-prefix: r}]}\n",
    "{\"port\": {\"tcp:{{.Vars.port}}\": {\"listening\": true, \"ip\": [\"127.0.0.1\"]}}}",
    "matching:\n  m:\n    content: [1, 2]\n    matches: {and: [{have-len: 2}, {not: {contain-element: 3}}, {or: [{gt: 1}, {contain-elements: [1]}]}]}\n",
    "{{- if eq (len \"ab\") 2 }}file:\n{{ range $i, $v := .Vars.list }}  /tmp/{{ $i }}:\n    exists: {{ $v | default false }}\n{{ end }}{{ else }}{{ getEnv \"HOME\" \"/\" | toUpper }}{{ end -}}\n",
    "{{ $x := printf \"%s-%d\" \"a\" 1 }}command:\n  {{ $x }}:\n    exec: '{{ if regexMatch \"^a\" $x }}true{{ end }}'\n    exit-status: 0\n",
    "gossfile:\n  \"*.yaml\": {skip: true}\ncommand:\n  x:\n    exec: 'true'\n    timeout: 10\n    stdout: {match-regexp: \"a(b|c)*\"}\n",
];

#[test]
fn mutated_goss_files_never_panic() {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    const ALPHABET: &[u8] = b"{}[]:,-!/\\\"' \n\t*?&|#.0123456789abcdefxyz";
    for round in 0..20_000 {
        let mut bytes = SEEDS[round % SEEDS.len()].as_bytes().to_vec();
        for _ in 0..1 + next() % 6 {
            let at = (next() as usize) % (bytes.len() + 1);
            match next() % 3 {
                0 if at < bytes.len() => {
                    bytes.remove(at);
                }
                1 => bytes.insert(at, ALPHABET[(next() as usize) % ALPHABET.len()]),
                _ if at < bytes.len() => bytes[at] = next() as u8,
                _ => {}
            }
        }
        phoenix_check::fuzzing::check_file(&bytes);
    }
}
