//! The man pages and completions kept in `contrib/` are exactly what the code generates now.

use std::path::{Path, PathBuf};

#[test]
fn generated_files_match_the_code() {
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fresh = std::env::temp_dir().join(format!("gkm-docs-drift-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&fresh);
    let generated = gkm_docs::generate(&fresh).unwrap();
    let fix = format!(
        "the man pages and completions in contrib/ differ from the code: run `{}` from the \
         repository's root and commit the result",
        gkm_docs::REGENERATE
    );
    let mut kept: Vec<PathBuf> = Vec::new();
    for dir in ["man", "completions"] {
        let root = contrib.join(dir);
        assert!(root.is_dir(), "{} is missing; {fix}", root.display());
        kept.extend(
            gkm_docs::files(&contrib, &root)
                .unwrap()
                .into_iter()
                .filter(|p| !p.ends_with(".gitignore")),
        );
    }
    kept.sort();
    assert_eq!(kept, generated, "{fix}");
    // Every binary has its page and its completion for each shell.
    for name in ["gkm-server", "gkmctl", "gkm-member", "gkm-demo"] {
        for file in [
            format!("man/{name}.1"),
            format!("completions/bash/{name}"),
            format!("completions/zsh/_{name}"),
            format!("completions/fish/{name}.fish"),
        ] {
            assert!(generated.contains(&PathBuf::from(&file)), "no {file}");
        }
    }
    for file in &generated {
        let old = std::fs::read(contrib.join(file)).unwrap();
        let new = std::fs::read(fresh.join(file)).unwrap();
        assert!(old == new, "{} differs; {fix}", file.display());
    }
    let page = std::fs::read_to_string(fresh.join("man/gkmctl.1")).unwrap();
    assert!(page.contains("\\-\\-json"), "{page}");
    std::fs::remove_dir_all(&fresh).unwrap();
}
