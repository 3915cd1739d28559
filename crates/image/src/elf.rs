//! What a program needs to start: an ELF binary's interpreter (`PT_INTERP`) and libraries
//! (`DT_NEEDED`, found through its run paths and the usual library directories), or a script's
//! `#!` interpreter. Used two ways: a `copy` step with `libraries = true` brings a binary's
//! library closure from the baking host, and a bake warns when the entrypoint's needs are
//! missing from the image (it would start on the host, not in a container).

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::ImageError;
use crate::files::{FileKind, FileManifest};

/// Binaries larger than this are not parsed.
const MAX_BINARY: u64 = 1 << 30;

/// What a program needs from the root it runs in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Needs {
    /// The ELF interpreter or the `#!` program, an absolute path.
    pub interpreter: Option<String>,
    /// Library names (`libc.so.6`).
    pub libraries: Vec<String>,
    /// `DT_RUNPATH` and `DT_RPATH` directories, `$ORIGIN` left as is.
    pub run_paths: Vec<String>,
}

/// The needs of a program's bytes; `None` for anything that is neither ELF nor a script.
pub(crate) fn needs(bytes: &[u8]) -> Option<Needs> {
    if let Some(line) = bytes.strip_prefix(b"#!") {
        let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
        let text = String::from_utf8_lossy(line);
        let program = text.split_whitespace().next()?.to_string();
        return Some(Needs {
            interpreter: Some(program),
            ..Needs::default()
        });
    }
    let elf = goblin::elf::Elf::parse(bytes).ok()?;
    Some(Needs {
        interpreter: elf.interpreter.map(str::to_string),
        libraries: elf.libraries.iter().map(|l| l.to_string()).collect(),
        run_paths: elf
            .runpaths
            .iter()
            .chain(&elf.rpaths)
            .flat_map(|paths| paths.split(':'))
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

/// Where libraries are looked for when no run path names them: the loader's trusted
/// directories on Debian-like systems (multiarch first) and others.
fn library_dirs() -> Vec<String> {
    let triplet = format!("{}-linux-gnu", std::env::consts::ARCH);
    vec![
        format!("/lib/{triplet}"),
        format!("/usr/lib/{triplet}"),
        "/lib64".into(),
        "/usr/lib64".into(),
        "/lib".into(),
        "/usr/lib".into(),
        "/usr/local/lib".into(),
    ]
}

/// The directories `needs`' libraries are looked up in, `$ORIGIN` as the program's directory.
fn search_dirs(needs: &Needs, origin: &str) -> Vec<String> {
    needs
        .run_paths
        .iter()
        .map(|p| p.replace("$ORIGIN", origin).replace("${ORIGIN}", origin))
        .chain(library_dirs())
        .collect()
}

fn read_program(path: &Path) -> Result<Vec<u8>, ImageError> {
    let file = fs::File::open(path).map_err(ImageError::io("open", path))?;
    let mut bytes = Vec::new();
    file.take(MAX_BINARY)
        .read_to_end(&mut bytes)
        .map_err(ImageError::io("read", path))?;
    Ok(bytes)
}

/// Every file of this host the program at `binary` needs to start, recursively: the
/// interpreter and each library, as canonical paths (symlinks resolved). Nothing for a
/// static binary or a file that is not a program.
pub(crate) fn host_closure(binary: &Path) -> Result<Vec<(String, PathBuf)>, ImageError> {
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut queue = vec![binary.to_path_buf()];
    while let Some(program) = queue.pop() {
        let Some(needs) = needs(&read_program(&program)?) else {
            continue;
        };
        let origin = program
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        if let Some(interpreter) = &needs.interpreter
            && seen.insert(interpreter.clone())
        {
            // The loader must be at the very path the binary names.
            let real = fs::canonicalize(interpreter).map_err(|_| ImageError::MissingSource {
                path: interpreter.into(),
                context: "/ (the interpreter of a copied binary)".into(),
            })?;
            found.push((interpreter.clone(), real));
        }
        for library in &needs.libraries {
            if !seen.insert(library.clone()) {
                continue;
            }
            let located = search_dirs(&needs, &origin)
                .iter()
                .map(|dir| Path::new(dir).join(library))
                .find(|candidate| candidate.is_file());
            let Some(path) = located else {
                return Err(ImageError::MissingSource {
                    path: library.into(),
                    context: format!(
                        "this host's library directories (needed by {})",
                        program.display()
                    )
                    .into(),
                });
            };
            let real = fs::canonicalize(&path).map_err(ImageError::io("resolve", &path))?;
            found.push((real.display().to_string(), real.clone()));
            queue.push(real);
        }
    }
    Ok(found)
}

/// What of `needs` the image (its merged file manifest) lacks; empty when it can start.
pub(crate) fn missing(needs: &Needs, program: &str, image: &FileManifest) -> Vec<String> {
    let mut missing = Vec::new();
    if let Some(interpreter) = &needs.interpreter
        && !exists(image, interpreter)
    {
        missing.push(interpreter.clone());
    }
    let origin = Path::new(program)
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let dirs = search_dirs(needs, &origin);
    for library in &needs.libraries {
        if !dirs
            .iter()
            .any(|dir| exists(image, &format!("{dir}/{library}")))
        {
            missing.push(library.clone());
        }
    }
    missing
}

/// True when `path` names a file of the image, following its symlinks (inside the image).
pub(crate) fn exists(image: &FileManifest, path: &str) -> bool {
    resolve(image, path, 0).is_some_and(|(kind, _)| kind == FileKind::File)
}

/// The path of the file `path` leads to in the image (no leading `/`), following symlinks.
pub(crate) fn file_behind(image: &FileManifest, path: &str) -> Option<String> {
    resolve(image, path, 0)
        .filter(|(kind, _)| *kind == FileKind::File)
        .map(|(_, path)| path)
}

/// What `path` leads to in the image, and its path, following symlinks (at most 40, as Linux).
fn resolve(image: &FileManifest, path: &str, depth: u32) -> Option<(FileKind, String)> {
    if depth > 40 {
        return None;
    }
    let mut walked = String::new();
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    for (i, part) in parts.iter().enumerate() {
        if *part == ".." {
            walked = walked
                .rsplit_once('/')
                .map(|(d, _)| d.to_string())
                .unwrap_or_default();
            continue;
        }
        let next = if walked.is_empty() {
            part.to_string()
        } else {
            format!("{walked}/{part}")
        };
        let entry = image.get(&next)?;
        if entry.kind == FileKind::Symlink {
            let target = entry.link.clone().unwrap_or_default();
            let rest = parts[i + 1..].join("/");
            let base = if target.starts_with('/') {
                target
            } else {
                format!("/{walked}/{target}")
            };
            return resolve(image, &format!("{base}/{rest}"), depth + 1);
        }
        walked = next;
    }
    image.get(&walked).map(|e| (e.kind, walked.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::FileEntry;

    fn entry(path: &str, kind: FileKind, link: Option<&str>) -> FileEntry {
        FileEntry {
            path: path.into(),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            size: 1,
            sha256: None,
            link: link.map(str::to_string),
        }
    }

    #[test]
    fn this_test_binary_needs_the_host_loader_and_libc() {
        let me = std::env::current_exe().unwrap();
        let needs = needs(&fs::read(&me).unwrap()).unwrap();
        let interpreter = needs
            .interpreter
            .clone()
            .expect("a dynamically linked test binary");
        assert!(interpreter.starts_with('/'), "{interpreter}");
        assert!(
            needs.libraries.iter().any(|l| l.starts_with("libc.so")),
            "{needs:?}"
        );
        let closure = host_closure(&me).unwrap();
        assert!(
            closure.iter().any(|(at, _)| *at == interpreter),
            "{closure:?}"
        );
        assert!(
            closure.iter().any(|(at, _)| at.ends_with("/libc.so.6")),
            "{closure:?}"
        );
        assert!(closure.iter().all(|(_, real)| real.is_file()));
        // An empty image has none of it; one with the closure has it all.
        assert_eq!(
            missing(&needs, "/bin/app", &FileManifest::default()).len(),
            1 + needs.libraries.len()
        );
        let mut files: Vec<FileEntry> = Vec::new();
        for (at, _) in &closure {
            let path = at.trim_start_matches('/');
            let mut parent = String::new();
            for part in path.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
                parent = if parent.is_empty() {
                    part.to_string()
                } else {
                    format!("{parent}/{part}")
                };
                files.push(entry(&parent, FileKind::Dir, None));
            }
            files.push(entry(path, FileKind::File, None));
        }
        let image = FileManifest::merge([files.as_slice()]);
        assert_eq!(missing(&needs, "/bin/app", &image), Vec::<String>::new());
    }

    #[test]
    fn scripts_need_their_interpreter_and_links_are_followed_inside_the_image() {
        let needs = needs(b"#!/bin/sh -e\necho hi\n").unwrap();
        assert_eq!(needs.interpreter.as_deref(), Some("/bin/sh"));
        assert!(super::needs(b"\x7fELF garbage").is_none());
        assert!(super::needs(b"plain text").is_none());
        let layer = vec![
            entry("usr", FileKind::Dir, None),
            entry("usr/bin", FileKind::Dir, None),
            entry("usr/bin/busybox", FileKind::File, None),
            entry("bin", FileKind::Symlink, Some("usr/bin")),
            entry("usr/bin/sh", FileKind::Symlink, Some("busybox")),
            entry("loop", FileKind::Symlink, Some("/loop")),
        ];
        let image = FileManifest::merge([layer.as_slice()]);
        assert!(exists(&image, "/bin/sh"));
        assert!(missing(&needs, "/srv/run.sh", &image).is_empty());
        assert!(!exists(&image, "/loop/x"));
        assert!(!exists(&image, "/bin/bash"));
    }
}
