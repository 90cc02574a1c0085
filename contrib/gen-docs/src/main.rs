//! `gkm-docs [OUT_DIR]`: writes the man pages and shell completions of gkm's binaries under
//! OUT_DIR (default `contrib`): `OUT_DIR/man/*.1` and `OUT_DIR/completions/{bash,zsh,fish}/*`.

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let out = std::env::args_os()
        .nth(1)
        .map_or_else(|| "contrib".into(), std::path::PathBuf::from);
    let written = gkm_docs::generate(&out).with_context(|| {
        format!(
            "generating into {}; pass a writable directory",
            out.display()
        )
    })?;
    for file in written {
        println!("{}", out.join(file).display());
    }
    Ok(())
}
