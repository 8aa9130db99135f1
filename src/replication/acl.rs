//! Native mode: whether both Redis of a pair hold the same ACL users. Redis replicates no
//! ACL rule, so users created on one Redis only are refused by the other after a failover;
//! the shell compares both Redis's `ACL LIST` and says which users differ. No I/O here.

/// What the last comparison found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AclCheck {
    /// Not compared (one Redis did not answer: down, restarting, failing over).
    #[default]
    Pending,
    /// Both hold the same users with the same rules.
    Same,
    /// These users are missing on one side or have other rules there (sorted names).
    Differ(Vec<String>),
    /// `ACL LIST` could not be read (the proxy's Redis user lacks the permission, or an
    /// old Redis): the reason.
    Unknown(String),
}

impl AclCheck {
    /// The status line's value.
    pub fn show(&self) -> String {
        match self {
            AclCheck::Pending => "pending".into(),
            AclCheck::Same => "same".into(),
            AclCheck::Differ(names) => format!("differ users={}", names.join(",")),
            AclCheck::Unknown(why) => format!("unknown ({why})"),
        }
    }
}

/// The user a line of `ACL LIST` describes (`user <name> <rules...>`).
fn user_of(line: &str) -> Option<&str> {
    let mut parts = line.split_ascii_whitespace();
    (parts.next() == Some("user")).then(|| parts.next()).flatten()
}

/// Compare two `ACL LIST` replies (one line per user). Rules compare as written by Redis
/// (it prints them in a canonical order, and hashed passwords, so equal users print equal).
pub fn compare(a: &[String], b: &[String]) -> AclCheck {
    let index = |lines: &[String]| -> std::collections::BTreeMap<String, String> {
        lines.iter().filter_map(|l| user_of(l).map(|u| (u.to_string(), l.trim().to_string()))).collect()
    };
    let (a, b) = (index(a), index(b));
    let mut differ: Vec<String> =
        a.iter().filter(|(u, rule)| b.get(*u) != Some(rule)).map(|(u, _)| u.clone()).collect();
    differ.extend(b.keys().filter(|u| !a.contains_key(*u)).cloned());
    differ.sort();
    differ.dedup();
    if differ.is_empty() {
        AclCheck::Same
    } else {
        AclCheck::Differ(differ)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn same_users_in_any_order_are_same() {
        let a = lines(&["user default on nopass ~* &* +@all", "user app on #ab ~app:* resetchannels -@all +get"]);
        let b = lines(&["user app on #ab ~app:* resetchannels -@all +get", "user default on nopass ~* &* +@all"]);
        assert_eq!(compare(&a, &b), AclCheck::Same);
    }

    #[test]
    fn missing_and_changed_users_are_named() {
        let a = lines(&[
            "user default on nopass ~* &* +@all",
            "user app on #ab ~app:* -@all +get",
            "user ops on #cd ~* +@all",
        ]);
        let b = lines(&[
            "user default on nopass ~* &* +@all",
            "user app on #ab ~app:* -@all +get +set",
            "user new on #ef ~* +@all",
        ]);
        assert_eq!(compare(&a, &b), AclCheck::Differ(vec!["app".into(), "new".into(), "ops".into()]));
        assert_eq!(compare(&a, &b).show(), "differ users=app,new,ops");
    }
}
