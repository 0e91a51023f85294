//! Packing a directory (or single file) of Tensorlake 0.3.9 Python code into
//! the application ZIP the function executor loads: every `.py` file at its
//! relative path, plus `.tensorlake_code_manifest.json` naming each
//! `@function`-decorated top-level function and the module that defines it.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::DevServerError;

/// The manifest the function executor reads from the ZIP root.
pub const CODE_MANIFEST_NAME: &str = ".tensorlake_code_manifest.json";

/// A packed application.
#[derive(Debug, Clone)]
pub struct PackedApp {
    pub zip: Vec<u8>,
    /// Function name -> module import name.
    pub functions: Vec<(String, String)>,
}

/// Top-level functions decorated with `@function` in one module's source.
pub fn find_functions(source: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut decorated = false;
    for line in source.lines() {
        if line.is_empty()
            || line.starts_with(char::is_whitespace)
            || line.starts_with(')')
            || line.starts_with('#')
        {
            continue; // Blank, indented, comment or decorator continuation.
        }
        if let Some(d) = line.strip_prefix('@') {
            let name = d.split(['(', ' ']).next().unwrap_or("");
            if name == "function" || name.ends_with(".function") {
                decorated = true;
            }
            continue;
        }
        let def = line
            .strip_prefix("async def ")
            .or_else(|| line.strip_prefix("def "));
        if let Some(rest) = def
            && decorated
        {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push(name);
            }
        }
        decorated = false;
    }
    found
}

fn python_files(root: &Path) -> Result<Vec<PathBuf>, DevServerError> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| DevServerError::App(format!("reading {}: {e}", dir.display())))?;
        for entry in entries {
            let entry = entry
                .map_err(|e| DevServerError::App(format!("reading {}: {e}", dir.display())))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.') || name == "__pycache__" || name == "venv" {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if name.ends_with(".py") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Packs `path` (a directory or a `.py` file).
pub fn pack(path: &Path) -> Result<PackedApp, DevServerError> {
    let (root, files) = if path.is_file() {
        (
            path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            vec![path.to_path_buf()],
        )
    } else if path.is_dir() {
        (path.to_path_buf(), python_files(path)?)
    } else {
        return Err(DevServerError::App(format!(
            "{} is neither a file nor a directory",
            path.display()
        )));
    };
    let mut functions = Vec::new();
    let mut sources = Vec::new();
    for file in &files {
        let rel = file
            .strip_prefix(&root)
            .unwrap_or(file)
            .to_string_lossy()
            .replace('\\', "/");
        let source = std::fs::read_to_string(file)
            .map_err(|e| DevServerError::App(format!("reading {}: {e}", file.display())))?;
        let module = rel
            .trim_end_matches(".py")
            .trim_end_matches("/__init__")
            .replace('/', ".");
        for f in find_functions(&source) {
            functions.push((f, module.clone()));
        }
        sources.push((rel, source));
    }
    if functions.is_empty() {
        return Err(DevServerError::App(format!(
            "no @function-decorated functions found in {}",
            path.display()
        )));
    }
    let manifest = serde_json::json!({
        "functions": functions.iter().map(|(f, m)| (f.clone(), serde_json::json!({"name": f, "module_import_name": m}))).collect::<serde_json::Map<_, _>>()
    });
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    let zip_err =
        |e: zip::result::ZipError| DevServerError::App(format!("writing application zip: {e}"));
    writer
        .start_file(CODE_MANIFEST_NAME, options)
        .map_err(zip_err)?;
    writer
        .write_all(manifest.to_string().as_bytes())
        .map_err(|e| DevServerError::App(e.to_string()))?;
    for (rel, source) in &sources {
        writer.start_file(rel.as_str(), options).map_err(zip_err)?;
        writer
            .write_all(source.as_bytes())
            .map_err(|e| DevServerError::App(e.to_string()))?;
    }
    let zip = writer.finish().map_err(zip_err)?.into_inner();
    Ok(PackedApp { zip, functions })
}

/// Function names listed in a packed application's manifest.
pub fn manifest_functions(zip_bytes: &[u8]) -> Result<Vec<String>, DevServerError> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip_bytes))
        .map_err(|e| DevServerError::BadRequest(format!("application is not a ZIP: {e}")))?;
    let mut file = archive.by_name(CODE_MANIFEST_NAME).map_err(|e| {
        DevServerError::BadRequest(format!("application ZIP has no {CODE_MANIFEST_NAME}: {e}"))
    })?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text)
        .map_err(|e| DevServerError::BadRequest(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| DevServerError::BadRequest(format!("{CODE_MANIFEST_NAME}: {e}")))?;
    let functions = v
        .get("functions")
        .and_then(|f| f.as_object())
        .ok_or_else(|| {
            DevServerError::BadRequest(format!("{CODE_MANIFEST_NAME} has no functions object"))
        })?;
    Ok(functions.keys().cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_decorated_top_level_functions() {
        let src = "from tensorlake.applications import application, function\n\n@application()\n@function(\n    description=\"x\",\n)\ndef greet(name: str) -> str:\n    def inner():\n        pass\n    return name\n\ndef helper():\n    pass\n\n@function()\nasync def later(x):\n    return x\n";
        assert_eq!(find_functions(src), vec!["greet", "later"]);
    }

    #[test]
    fn packs_and_reads_back_manifest() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("hello.py"),
            "@function()\ndef a():\n    pass\n",
        )
        .expect("write");
        std::fs::create_dir(dir.path().join("pkg")).expect("mkdir");
        std::fs::write(
            dir.path().join("pkg/mod.py"),
            "@function()\ndef b():\n    pass\n",
        )
        .expect("write");
        let packed = pack(dir.path()).expect("pack");
        assert_eq!(
            packed.functions,
            vec![("a".into(), "hello".into()), ("b".into(), "pkg.mod".into())]
        );
        let mut names = manifest_functions(&packed.zip).expect("manifest");
        names.sort();
        assert_eq!(names, vec!["a", "b"]);
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(pack(empty.path()).is_err());
    }
}
