//! Public goss files, as people wrote them (`tests/goss-corpus/`, sources and licences in its
//! `SOURCES.tsv`), loaded as `phoenix verify` loads them: templates rendered with their vars,
//! includes followed. Each must load with the number of resources and tests recorded for it.
//! They are loaded only, never run: they probe hosts of their own (public addresses among them)
//! and some write under /tmp.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use phoenix_check::{TemplateData, load, load_vars, merge_vars, parse_vars};

/// One line of `SOURCES.tsv`.
struct Source {
    repository: String,
    licence: String,
    file: String,
    vars: Option<String>,
    inline: Option<String>,
    resources: usize,
    tests: usize,
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goss-corpus")
}

fn sources() -> Vec<Source> {
    let text = std::fs::read_to_string(corpus().join("SOURCES.tsv")).unwrap();
    let optional = |field: &str| (field != "-").then(|| field.to_string());
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            assert_eq!(fields.len(), 8, "SOURCES.tsv: {line}");
            Source {
                repository: fields[0].to_string(),
                licence: fields[2].to_string(),
                file: fields[3].to_string(),
                vars: optional(fields[4]),
                inline: optional(fields[5]),
                resources: fields[6].parse().unwrap_or(usize::MAX),
                tests: fields[7].parse().unwrap_or(usize::MAX),
            }
        })
        .collect()
}

/// What loading one file gave: resources and tests, or the error.
fn load_source(root: &Path, source: &Source) -> Result<(usize, usize), String> {
    let mut vars = serde_json::Value::Null;
    if let Some(file) = &source.vars {
        merge_vars(
            &mut vars,
            load_vars(&root.join(file)).map_err(|e| e.to_string())?,
        );
    }
    if let Some(text) = &source.inline {
        let inline = parse_vars(Path::new("--vars-inline"), text).map_err(|e| e.to_string())?;
        merge_vars(&mut vars, inline);
    }
    // No environment: `getEnv` takes its defaults, whoever runs the test.
    let data = TemplateData {
        vars,
        env: BTreeMap::new(),
    };
    let suite = load(&root.join(&source.file), &data).map_err(|e| e.to_string())?;
    let tests = suite.checks.iter().map(|c| c.attributes.len()).sum();
    Ok((suite.checks.len(), tests))
}

#[test]
fn public_goss_files_load_with_every_resource_and_test() {
    let sources = sources();
    assert!(sources.len() >= 10, "the corpus shrank: {}", sources.len());
    let mut understood = 0;
    let mut wrong = Vec::new();
    for source in &sources {
        let root = corpus().join(source.repository.replace('/', "+"));
        assert!(
            root.join("LICENSE").is_file(),
            "{}: its licence ({}) is not kept beside it",
            source.repository,
            source.licence
        );
        let got = load_source(&root, source);
        println!("{:40} {:45} {:?}", source.repository, source.file, got);
        match got {
            Ok(counts) if counts == (source.resources, source.tests) => understood += 1,
            Ok((resources, tests)) => wrong.push(format!(
                "{} {}: {resources} resources and {tests} tests, recorded {} and {}",
                source.repository, source.file, source.resources, source.tests
            )),
            Err(error) => wrong.push(format!("{} {}: {error}", source.repository, source.file)),
        }
    }
    println!("understood {understood} of {}", sources.len());
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
