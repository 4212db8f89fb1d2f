//! Objects in an object store, named by URL (`file:///path`, `s3://bucket/key`),
//! through the `object_store` crate. Used by `object-exists` health checks and
//! the trigger-object DR switch; backups will use the same stores.

use std::sync::Arc;

use anyhow::{Context, Result};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::config::{ObjectStoreConfig, ObjectUrl};

/// One object: its store and its path there.
#[derive(Clone)]
pub struct ObjectRef {
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    pub url: String,
}

impl std::fmt::Debug for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

impl ObjectRef {
    /// Prepares access to the object at `url` (nothing is contacted yet).
    /// S3 credentials come from the environment (`AWS_ACCESS_KEY_ID`, ...).
    pub fn open(url: &str, config: &ObjectStoreConfig) -> Result<ObjectRef> {
        let parsed: ObjectUrl = url.parse().map_err(|e: String| anyhow::anyhow!(e))?;
        let (store, path): (Arc<dyn ObjectStore>, ObjectPath) = match parsed {
            ObjectUrl::Local(p) => {
                let path =
                    ObjectPath::from_absolute_path(&p).with_context(|| format!("object path {}", p.display()))?;
                (Arc::new(LocalFileSystem::new()), path)
            }
            ObjectUrl::S3 { bucket, key } => {
                let mut b = AmazonS3Builder::from_env().with_bucket_name(&bucket);
                if let Some(e) = &config.s3_endpoint {
                    b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
                }
                b = b.with_region(config.s3_region.as_deref().unwrap_or("us-east-1"));
                let store = b.build().with_context(|| format!("prepare the S3 client for {url}"))?;
                (Arc::new(store), ObjectPath::from(key))
            }
        };
        Ok(ObjectRef { store, path, url: url.to_string() })
    }

    /// The object's version (ETag, else modification time and size) if it
    /// exists, `None` if it does not; an error when the store cannot tell.
    pub async fn version(&self) -> Result<Option<String>> {
        match self.store.head(&self.path).await {
            Ok(meta) => Ok(Some(
                meta.e_tag.unwrap_or_else(|| format!("{}-{}", meta.last_modified.timestamp_millis(), meta.size)),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(anyhow::Error::new(e).context(format!("look up {}", self.url))),
        }
    }
}
