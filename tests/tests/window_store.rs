//! The DynamoDB adapter of the window rules (`shared::adapters::sdk`), against moto: the
//! carried window's attributes and the conditions that keep it, share the entry limit
//! with it, and drop it (docs/protocol.md, aggregator step 3 and refresher steps 1
//! and 5). The rules themselves are unit-tested in `shared/src/window.rs`.

use integration_tests::aws::BoxError;
use integration_tests::stack::{Stack, StackOptions};
use shared::adapters::sdk::DynamoWindowStore;
use shared::ports::WindowStore;
use shared::window::{
    ChangeSet, CloseOutcome, OpenExpectation, RefreshLog, WindowItem, MAX_WINDOW_FOLDERS,
    STALE_WINDOW_GRACE_MS,
};

fn folders(list: &[&str]) -> ChangeSet {
    let mut changes = ChangeSet::default();
    for folder in list {
        changes.add_folder(folder);
    }
    changes
}

fn mark(generation: u64) -> RefreshLog {
    RefreshLog {
        generation: Some(generation),
        started_at_ms: 1,
        refreshes: vec![],
    }
}

/// Opens the next window as an opener that reads the item now sees it.
async fn open_next(
    store: &DynamoWindowStore,
    bucket: &str,
    changes: &ChangeSet,
    now_ms: i64,
) -> Result<WindowItem, BoxError> {
    let item = store.read(bucket).await?;
    let opened = store
        .open(
            bucket,
            OpenExpectation::from_item(item.as_ref()),
            changes,
            now_ms,
            10,
        )
        .await?;
    Ok(opened.ok_or_else(|| format!("the open at {now_ms} failed"))?)
}

async fn store() -> Result<(Stack, DynamoWindowStore), BoxError> {
    let stack = Stack::start(StackOptions::default()).await?;
    let store = DynamoWindowStore::new(stack.clients.dynamodb.clone(), stack.table.clone());
    Ok((stack, store))
}

#[tokio::test]
async fn a_carried_window_is_kept_apart_handed_off_by_its_redelivery_and_dropped_by_its_mark(
) -> Result<(), BoxError> {
    let (_stack, store) = store().await?;
    let b = "carry";
    let first = OpenExpectation::from_item(None);
    let opened = store.open(b, first, &folders(&["a/"]), 0, 10).await?;
    assert_eq!(opened.map(|w| w.generation), Some(1));
    let seen = store.read(b).await?.ok_or("no item")?;
    assert!(store.join(b, &seen, &folders(&["b/"]), 5).await?.is_some());
    assert_eq!(
        store.close(b, 1, 10).await?,
        CloseOutcome::Refresh(folders(&["a/", "b/"]))
    );

    // Window 2 opens before window 1's mark: it carries window 1 apart.
    let item = store.read(b).await?;
    let expected = OpenExpectation::from_item(item.as_ref());
    let clean = OpenExpectation {
        carry: None,
        ..expected.clone()
    };
    assert!(
        store
            .open(b, clean, &folders(&["x/"]), 11, 10)
            .await?
            .is_none(),
        "a clean open would drop window 1's folders"
    );
    let opened = store
        .open(b, expected, &folders(&["x/"]), 11, 10)
        .await?
        .ok_or("the carrying open failed")?;
    assert_eq!(opened.changes, folders(&["x/"]));
    assert_eq!(
        opened.carried.map(|c| (c.generation, c.changes)),
        Some((1, folders(&["a/", "b/"])))
    );

    // Window 1's message comes back (its first delivery died after the close): it
    // hands the carried folders off, and its mark drops them in the same write.
    assert_eq!(
        store.close(b, 1, 12).await?,
        CloseOutcome::RefreshCarried(folders(&["a/", "b/"]))
    );
    store.record_refresh(b, &mark(1)).await?;
    let item = store.read(b).await?.ok_or("no item")?;
    assert_eq!((item.refreshed_generation, item.carried), (1, None));
    assert_eq!(
        store.close(b, 1, 13).await?,
        CloseOutcome::CarriedForward {
            current_generation: 2
        }
    );
    // Window 2 refreshes only its own folder.
    assert_eq!(
        store.close(b, 2, 21).await?,
        CloseOutcome::Refresh(folders(&["x/"]))
    );
    store.record_refresh(b, &mark(2)).await?;
    let item = store.read(b).await?;
    assert_eq!(OpenExpectation::from_item(item.as_ref()).carry, None);
    Ok(())
}

#[tokio::test]
async fn a_late_mark_keeps_a_newer_carried_window_and_a_close_refreshes_both(
) -> Result<(), BoxError> {
    let (_stack, store) = store().await?;
    let b = "late-mark";
    open_next(&store, b, &folders(&["a/"]), 0).await?;
    store.close(b, 1, 10).await?;
    open_next(&store, b, &folders(&["x/"]), 11).await?;
    // Window 2 closes before window 1's mark: it refreshes both.
    assert_eq!(
        store.close(b, 2, 21).await?,
        CloseOutcome::Refresh(folders(&["a/", "x/"]))
    );
    // Window 3 opens before window 2's mark: one carried set holds both windows.
    let opened = open_next(&store, b, &folders(&["y/"]), 22).await?;
    assert_eq!(
        opened.carried.map(|c| (c.generation, c.changes)),
        Some((2, folders(&["a/", "x/"])))
    );
    // Window 1's late mark is recorded, and keeps window 2's folders.
    store.record_refresh(b, &mark(1)).await?;
    let item = store.read(b).await?.ok_or("no item")?;
    assert_eq!(item.refreshed_generation, 1);
    assert_eq!(item.carried.map(|c| c.generation), Some(2));
    store.record_refresh(b, &mark(2)).await?;
    let item = store.read(b).await?.ok_or("no item")?;
    assert_eq!((item.refreshed_generation, item.carried), (2, None));
    Ok(())
}

#[tokio::test]
async fn a_carrying_open_fails_when_the_stale_window_took_a_join_since_it_looked(
) -> Result<(), BoxError> {
    let (_stack, store) = store().await?;
    let b = "stale";
    open_next(&store, b, &folders(&["a/"]), 0).await?;
    let stale = 10 + STALE_WINDOW_GRACE_MS;
    let seen = store.read(b).await?;
    let expected = OpenExpectation::from_item(seen.as_ref());
    // A joiner whose clock lags still joins the stale window.
    let lagging = seen.clone().ok_or("no item")?;
    assert!(store
        .join(b, &lagging, &folders(&["late/"]), stale - 1)
        .await?
        .is_some());
    assert!(
        store
            .open(b, expected, &folders(&["b/"]), stale, 10)
            .await?
            .is_none(),
        "the open would carry the window without late/"
    );
    let opened = open_next(&store, b, &folders(&["b/"]), stale).await?;
    assert_eq!(opened.changes_to_refresh(), folders(&["a/", "late/", "b/"]));
    Ok(())
}

#[tokio::test]
async fn a_window_and_the_window_it_carries_share_the_entry_limit() -> Result<(), BoxError> {
    let (_stack, store) = store().await?;
    let b = "limit";
    let mut many = ChangeSet::default();
    for i in 0..MAX_WINDOW_FOLDERS - 10 {
        many.add_folder(&format!("f{i}/"));
    }
    open_next(&store, b, &many, 0).await?;
    store.close(b, 1, 10).await?;
    let opened = open_next(&store, b, &folders(&["x/"]), 11).await?;
    let mut eleven = ChangeSet::default();
    for i in 0..11 {
        eleven.add_folder(&format!("g{i}/"));
    }
    assert!(
        store.join(b, &opened, &eleven, 12).await?.is_none(),
        "191 + 11 entries are over the limit"
    );
    let rest = opened.uncovered(&eleven);
    assert!(
        rest.whole_bucket,
        "what does not fit becomes the whole bucket"
    );
    let joined = store.join(b, &opened, &rest, 12).await?.ok_or("join")?;
    assert!(joined.changes.whole_bucket);
    Ok(())
}
