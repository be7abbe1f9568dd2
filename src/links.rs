//! Which components may call us, and which namespace each link's calls use.
//!
//! The host tells us of links on the control subjects (`linkdefs.put`/`linkdefs.del`); each
//! invocation then carries `source-id` and `link-name` headers, which [`LinkTable::resolve`]
//! turns into a namespace. The SDK keeps its own link map, but keyed by source only, so a
//! component with two named links to us would lose one: we keep ours by (source, link name).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::config::LinkPolicy;

/// The engine's namespace of unlinked calls that name no source (with `allow_unlinked=true`).
pub const ANONYMOUS_NAMESPACE: &str = "anonymous:";

/// The engine's name of a namespace that link config names (`namespace=<name>`): shared by
/// every link naming it. Tagged, like [`component_namespace`], so that the two kinds can never
/// name the same data.
pub fn named_namespace(name: &str) -> Arc<str> {
    Arc::from(format!("named:{name}"))
}

/// The engine's name of a component's own namespace (its links name none): no other
/// component reaches it, whatever its link config says.
pub fn component_namespace(component: &str) -> Arc<str> {
    Arc::from(format!("component:{component}"))
}

/// One active link: the namespace its calls use, and what its config asks of their data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub namespace: Arc<str>,
    pub policy: LinkPolicy,
}

/// Active links to this provider: source component → link name → link.
#[derive(Default)]
pub struct LinkTable {
    // A std lock: held only for a map look-up, never across an await. Reads (one per call)
    // vastly outnumber writes (link changes).
    links: RwLock<HashMap<String, HashMap<String, Arc<Link>>>>,
}

impl LinkTable {
    /// Records the link `source` → us named `link_name`, whose calls use `namespace` (with
    /// no expiry or eviction). Answers the namespace it replaced, if the link was known.
    pub fn put(&self, source: &str, link_name: &str, namespace: &str) -> Option<Arc<str>> {
        let link = Link {
            namespace: Arc::from(namespace),
            policy: LinkPolicy::default(),
        };
        self.put_link(source, link_name, link)
            .map(|old| old.namespace.clone())
    }

    /// Records the link `source` → us named `link_name`; answers the link it replaced.
    pub fn put_link(&self, source: &str, link_name: &str, link: Link) -> Option<Arc<Link>> {
        let mut links = self
            .links
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        links
            .entry(source.to_owned())
            .or_default()
            .insert(link_name.to_owned(), Arc::new(link))
    }

    /// Forgets a link; answers it if it was known. Data in its namespace stays.
    pub fn remove(&self, source: &str, link_name: &str) -> Option<Arc<Link>> {
        let mut links = self
            .links
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        let names = links.get_mut(source)?;
        let removed = names.remove(link_name);
        if names.is_empty() {
            links.remove(source);
        }
        removed
    }

    /// The active link `source` → us named `link_name`.
    pub fn resolve(&self, source: &str, link_name: &str) -> Option<Arc<Link>> {
        let links = self
            .links
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        links.get(source)?.get(link_name).cloned()
    }

    /// Whether namespace `namespace` evicts: only while it has active links and every one of
    /// them asks for eviction. Links that share a namespace share its data, so one link that
    /// did not opt in keeps that data from being evicted by another's writes.
    pub fn evicts(&self, namespace: &str) -> bool {
        let links = self
            .links
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut sharing = links
            .values()
            .flat_map(HashMap::values)
            .filter(|link| &*link.namespace == namespace)
            .peekable();
        sharing.peek().is_some() && sharing.all(|link| link.policy.evicts)
    }

    /// How many links are active.
    pub fn len(&self) -> usize {
        let links = self
            .links
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        links.values().map(HashMap::len).sum()
    }

    /// Whether no link is active.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 1 snapshot's namespaces load as components' own: the store names them the
    /// way links do.
    #[test]
    fn version_1_snapshot_namespaces_are_components_own() {
        assert_eq!(
            &*component_namespace("c1"),
            keyvalue_store::snapshot::version_1_namespace("c1")
        );
    }

    #[test]
    fn links_resolve_by_source_and_name() {
        let t = LinkTable::default();
        assert_eq!(t.resolve("c1", "default"), None);
        t.put("c1", "default", "shared");
        t.put("c1", "cache", "c1-cache");
        t.put("c2", "default", "shared");
        let ns = |source, name| t.resolve(source, name).map(|l| l.namespace.to_string());
        assert_eq!(ns("c1", "default").as_deref(), Some("shared"));
        assert_eq!(ns("c1", "cache").as_deref(), Some("c1-cache"));
        assert_eq!(ns("c2", "cache"), None);
        assert_eq!(t.len(), 3);
        assert!(t.remove("c1", "default").is_some());
        assert!(t.remove("c1", "default").is_none());
        assert_eq!(ns("c1", "default"), None);
        assert_eq!(ns("c1", "cache").as_deref(), Some("c1-cache"));
        assert_eq!(t.put("c1", "cache", "other").as_deref(), Some("c1-cache"));
        assert!(t.remove("c1", "cache").is_some() && t.remove("c2", "default").is_some());
        assert!(t.is_empty());
    }

    #[test]
    fn a_namespace_evicts_only_while_every_link_to_it_asks_for_it() {
        let t = LinkTable::default();
        let link = |evicts| Link {
            namespace: Arc::from("named:cache"),
            policy: LinkPolicy {
                evicts,
                ..LinkPolicy::default()
            },
        };
        assert!(!t.evicts("named:cache"), "no link, no eviction");
        t.put_link("c1", "default", link(true));
        assert!(t.evicts("named:cache"));
        t.put_link("c2", "default", link(false));
        assert!(!t.evicts("named:cache"), "c2 did not opt in");
        t.put_link("c2", "default", link(true));
        assert!(t.evicts("named:cache"));
        t.put("c3", "default", "named:cache");
        assert!(!t.evicts("named:cache"));
        t.remove("c3", "default");
        assert!(t.evicts("named:cache"));
        assert!(!t.evicts("named:other"));
    }
}
