//! A TOML file of settings, for every ramsnap binary: `--config FILE` (or
//! `RAMSNAP_CONFIG=FILE`). Each key is the long name of one of the binary's
//! flags (`snapshot-listen`, or `snapshot_listen`), and its value is what
//! the flag would take (a string, number or boolean; an array for a flag
//! that takes a list).
//!
//! Precedence, highest first: **flags, then environment variables, then the
//! config file, then the defaults**. The file is read before the flags are
//! parsed, and each of its keys sets the environment variable its flag
//! reads, unless that variable is set already. So a key must name a flag
//! that has an environment variable (every setting of the services does).
//! An unknown key is an error that lists the known ones: a typo must not be
//! silently ignored.
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The `--config` flag every binary flattens in (clap accepts it; [`apply`]
/// has read the file by then).
#[derive(clap::Args, Debug, Clone)]
pub struct ConfigArg {
    /// A TOML file of settings: keys are flag names (`snapshot-listen =
    /// "0.0.0.0:50051"`). Flags and environment variables take precedence
    /// over it.
    #[arg(long = "config", env = "RAMSNAP_CONFIG", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
}

/// Reads the config file named by `args` (`--config FILE`, `--config=FILE`)
/// or RAMSNAP_CONFIG, if any, and sets the environment variables of its
/// keys that are not set yet. Call it at the very start of `main`, before
/// any thread starts (it sets environment variables).
pub fn apply(cmd: &clap::Command, args: &[String]) -> Result<Option<PathBuf>, String> {
    let path = args
        .iter()
        .enumerate()
        .find_map(|(i, a)| match a.strip_prefix("--config=") {
            Some(p) => Some(p.to_string()),
            None if a == "--config" => args.get(i + 1).cloned(),
            None => None,
        })
        .or_else(|| std::env::var("RAMSNAP_CONFIG").ok())
        .filter(|p| !p.is_empty());
    let Some(path) = path.map(PathBuf::from) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
    for (var, value) in settings(cmd, &text).map_err(|e| format!("config file {}: {e}", path.display()))? {
        if std::env::var_os(&var).is_none() {
            // SAFETY: called first thing in main, before any other thread.
            unsafe { std::env::set_var(&var, value) };
        }
    }
    Ok(Some(path))
}

/// (environment variable, value) for each key of the TOML `text`, checked
/// against `cmd`'s flags.
pub fn settings(cmd: &clap::Command, text: &str) -> Result<Vec<(String, String)>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let mut flags: BTreeMap<String, Option<String>> = BTreeMap::new();
    for arg in cmd.get_arguments() {
        let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
        for name in arg
            .get_long()
            .into_iter()
            .chain(arg.get_visible_aliases().into_iter().flatten())
        {
            flags.insert(name.to_string(), env.clone());
        }
    }
    let mut out = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let Some(env) = flags.get(&flag) else {
            let known: Vec<&str> = flags
                .iter()
                .filter(|(_, e)| e.is_some())
                .map(|(f, _)| f.as_str())
                .collect();
            return Err(format!(
                "unknown setting {key:?}; the settings are: {}",
                known.join(", ")
            ));
        };
        let Some(env) = env else {
            return Err(format!("setting {key:?} can only be given as a flag (--{flag})"));
        };
        let text = match &value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s.clone()),
                    toml::Value::Integer(i) => Ok(i.to_string()),
                    other => Err(format!(
                        "setting {key:?}: a list of strings or numbers, not {other}"
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
            other => {
                return Err(format!(
                    "setting {key:?}: a string, number, boolean or list, not {other}"
                ))
            }
        };
        out.push((env.clone(), text));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Args {
        #[arg(long, env = "T_LISTEN", default_value = "127.0.0.1:1")]
        listen: String,
        #[arg(long = "file-root", env = "T_ROOTS", value_delimiter = ',')]
        roots: Vec<String>,
        #[arg(long, env = "T_GRACE")]
        grace_secs: Option<u32>,
        #[arg(long)]
        no_env: bool,
        #[command(flatten)]
        config: ConfigArg,
    }

    #[test]
    fn keys_map_to_their_flags_variables() {
        let cmd = Args::command();
        let got = settings(
            &cmd,
            "listen = \"0.0.0.0:2\"\nfile_root = [\"/a\", \"/b\"]\ngrace-secs = 5\n",
        )
        .unwrap();
        assert_eq!(
            got,
            [
                ("T_ROOTS".to_string(), "/a,/b".to_string()),
                ("T_GRACE".to_string(), "5".to_string()),
                ("T_LISTEN".to_string(), "0.0.0.0:2".to_string()),
            ]
        );
        let e = settings(&cmd, "lisen = \"x\"").unwrap_err();
        assert!(
            e.contains("unknown setting \"lisen\"") && e.contains("listen"),
            "{e}"
        );
        let e = settings(&cmd, "no-env = true").unwrap_err();
        assert!(e.contains("only be given as a flag"), "{e}");
        assert!(settings(&cmd, "listen = ").is_err());
        assert!(settings(&cmd, "listen = { a = 1 }").is_err());
    }

    /// Flags beat the environment, which beats the file, which beats the
    /// defaults.
    #[test]
    fn precedence() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"file:1\"\ngrace_secs = 7\nfile-root = [\"/f\"]\n",
        )
        .unwrap();
        // SAFETY: this test's own variables; no other test reads them.
        unsafe { std::env::set_var("T_GRACE", "9") };
        let argv: Vec<String> = ["t", "--config", file.to_str().unwrap(), "--file-root", "/flag"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(apply(&Args::command(), &argv).unwrap(), Some(file.clone()));
        let a = Args::parse_from(&argv);
        assert_eq!(a.listen, "file:1", "the file over the default");
        assert_eq!(a.grace_secs, Some(9), "the environment over the file");
        assert_eq!(a.roots, ["/flag"], "a flag over the file");
        assert_eq!(a.config.config, Some(file));
        let missing: Vec<String> = ["t", "--config=/nonexistent.toml"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(apply(&Args::command(), &missing)
            .unwrap_err()
            .contains("/nonexistent.toml"));
    }
}
