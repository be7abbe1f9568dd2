//! Which components may call us, and which namespace each link's calls use.
//!
//! The host tells us of links on the control subjects (`linkdefs.put`/`linkdefs.del`); each
//! invocation then carries `source-id` and `link-name` headers, which [`LinkTable::resolve`]
//! turns into a namespace. The SDK keeps its own link map, but keyed by source only, so a
//! component with two named links to us would lose one: we keep ours by (source, link name).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

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

/// Active links to this provider: source component → link name → namespace.
#[derive(Default)]
pub struct LinkTable {
    // A std lock: held only for a map look-up, never across an await. Reads (one per call)
    // vastly outnumber writes (link changes).
    links: RwLock<HashMap<String, HashMap<String, Arc<str>>>>,
}

impl LinkTable {
    /// Records the link `source` → us named `link_name`, whose calls use `namespace`.
    /// Answers the namespace it replaced, if the link was known.
    pub fn put(&self, source: &str, link_name: &str, namespace: &str) -> Option<Arc<str>> {
        self.put_namespace(source, link_name, Arc::from(namespace))
    }

    /// Like [`LinkTable::put`], with the namespace already shared.
    pub fn put_namespace(
        &self,
        source: &str,
        link_name: &str,
        namespace: Arc<str>,
    ) -> Option<Arc<str>> {
        let mut links = self
            .links
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        links
            .entry(source.to_owned())
            .or_default()
            .insert(link_name.to_owned(), namespace)
    }

    /// Forgets a link; answers whether it was known. Data in its namespace stays.
    pub fn remove(&self, source: &str, link_name: &str) -> bool {
        let mut links = self
            .links
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        let Some(names) = links.get_mut(source) else {
            return false;
        };
        let removed = names.remove(link_name).is_some();
        if names.is_empty() {
            links.remove(source);
        }
        removed
    }

    /// The namespace of the active link `source` → us named `link_name`.
    pub fn resolve(&self, source: &str, link_name: &str) -> Option<Arc<str>> {
        let links = self
            .links
            .read()
            .unwrap_or_else(|poison| poison.into_inner());
        links.get(source)?.get(link_name).cloned()
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
        assert_eq!(t.resolve("c1", "default").as_deref(), Some("shared"));
        assert_eq!(t.resolve("c1", "cache").as_deref(), Some("c1-cache"));
        assert_eq!(t.resolve("c2", "cache"), None);
        assert_eq!(t.len(), 3);
        assert!(t.remove("c1", "default"));
        assert!(!t.remove("c1", "default"));
        assert_eq!(t.resolve("c1", "default"), None);
        assert_eq!(t.resolve("c1", "cache").as_deref(), Some("c1-cache"));
        assert_eq!(t.put("c1", "cache", "other").as_deref(), Some("c1-cache"));
        assert!(t.remove("c1", "cache") && t.remove("c2", "default"));
        assert!(t.is_empty());
    }
}
