//! A loopback stand-in for AWS Storage Gateway (S3 File Gateway), for tests.
//!
//! It speaks the real wire protocol, so the real `aws-sdk-storagegateway` client can talk
//! to it through its endpoint URL:
//!
//! * AWS JSON 1.1: `POST /`, header `X-Amz-Target: StorageGateway_20130630.<Operation>`,
//!   `Content-Type: application/x-amz-json-1.1`; responses are JSON with that content type
//!   and carry an `x-amzn-RequestId` header.
//! * Errors are HTTP 400 (client) or 5xx (server) with a body
//!   `{"__type": "<ErrorType>", "message": "...", "error": {"errorCode": "...", "errorDetails": {}}}`.
//!   The `error` object (a `StorageGatewayError`) belongs to Storage Gateway's own
//!   exceptions (`InvalidGatewayRequestException`, `InternalServerError`,
//!   `ServiceUnavailableError`); the generic protocol errors (`ValidationException`,
//!   `SerializationException`, `UnknownOperationException`) have no `error` object.
//! * SigV4 signatures are accepted without being checked.
//! * Regions, as in AWS: a request goes to the region of its SigV4 credential scope
//!   (`Authorization: AWS4-HMAC-SHA256 Credential=AKID/20260101/eu-west-1/storagegateway/aws4_request, ...`;
//!   [`REGION`] when a request is not signed). A gateway and its shares live in the
//!   region of the gateway's ARN ([`SgwStandIn::add_gateway_in`]), and a request to
//!   another region does not see them: `ListFileShares` leaves them out, and
//!   `Describe*FileShares` and `RefreshCache` answer "The specified file share was not
//!   found." as for a share that does not exist.
//!
//! Operations: `ListFileShares`, `DescribeNFSFileShares`, `DescribeSMBFileShares` and
//! `RefreshCache`. Anything else gets `UnknownOperationException`.
//!
//! The stand-in enforces the limits that the product must live with (see
//! `docs/spec.md`, "RefreshCache limits"): at most [`MAX_REFRESHES_IN_FLIGHT`]
//! refreshes in flight per share, 1 to 50 folders per refresh, 1 to 10 ARNs per
//! describe call, paged listings.
//!
//! Every request is recorded (in arrival order, including injected failures) so that
//! tests can assert on what a client really sent. Tests drive it through [`SgwStandIn`].
//!
//! # The cache model
//!
//! A bucket can be given an object source with [`SgwStandIn::set_bucket_source`]: moto's
//! S3 (listed with `ListObjectsV2` through `aws-sdk-s3`) or a [`BucketModel`] that the
//! test mutates in memory. The shares of such a bucket then model what a client of the
//! share sees:
//!
//! * A share's cache is a set of per-folder listings. Each cached folder (a path
//!   relative to the share root, the root itself included) holds the names of the
//!   objects directly in it and the names of its direct subfolders.
//! * The share's *view* ([`SgwStandIn::share_view`]) is what a client reaches by walking
//!   from the root through cached listings. A subfolder whose own listing was never
//!   loaded shows as an empty folder; a cached folder that no cached parent lists cannot
//!   be reached at all. This is why a new object at a new depth needs its new folders'
//!   parents refreshed too.
//! * A new share starts as a full snapshot of its bucket under its prefix (for an S3
//!   source, only after [`SgwStandIn::prime_share_cache`], because `add_share` cannot
//!   wait on S3). Snapshots are not counted as work.
//! * `RefreshCache` lists S3 when it is accepted, so a refresh that starts after a
//!   write sees that write. For each folder of `FolderList`: without `Recursive` it lists
//!   the folder with the delimiter `/` and replaces that folder's listing (subfolders
//!   that vanished drop out, and so do the cached contents of any folder below it that
//!   the new listing does not name; the contents of the remaining subfolders are not
//!   re-listed); with `Recursive` it lists every key under the folder and rebuilds the
//!   folder's whole cached subtree. A folder that does not exist in the bucket lists as
//!   empty. The folder's parents are not touched: a folder that no cached parent lists
//!   stays out of the view.
//! * `FolderList` entries are `/` or `/a/b` (leading `/`, no trailing `/`, no `//`);
//!   anything else is an `InvalidGatewayRequestException`, so client bugs show up.
//! * Concurrent refreshes of one S3-backed share apply their listings in the order the
//!   listings finish.
//! * The listing work is counted per refresh ([`RefreshRecord::work`]), per share and
//!   in total ([`ListingWork`]): objects returned (each stands for a HEAD per object),
//!   common prefixes returned, and `ListObjectsV2` requests at 1000 entries per page.
//! * If listing S3 fails, the refresh is still accepted (the real call is asynchronous
//!   too) and the failure is kept in [`RefreshRecord::listing_error`]; the folders that
//!   failed keep their old listings.
//!
//! A bucket without a source has no cache model: `RefreshCache` is validated, recorded
//! and limited as usual, and its work is zero.
//!
//! # Completion, and the refresh-complete event
//!
//! An accepted refresh stays in flight for `base + per_object × objects listed`
//! ([`SgwStandIn::set_refresh_duration`], [`SgwStandIn::set_refresh_time_per_object`];
//! the objects are [`ListingWork::objects_listed`] of that refresh, so a refresh of a
//! bucket without a source takes `base`). A background timer completes it at that
//! instant, on its own; [`SgwStandIn::complete_refreshes`] forces every refresh in
//! flight to complete now. Completion is one step under the state lock: the refresh
//! leaves the in-flight count and its [`CompletionEvent`] is recorded together, so a
//! third call on a share is accepted from the moment the first completion is recorded
//! and not before. (Any read of the in-flight count also completes what is due, so the
//! count never lags the clock when the timer task has not run yet.)
//!
//! When [`SgwStandIn::set_completion_events`] names an EventBridge endpoint (moto's),
//! each completion is put on an event bus there with `PutEvents`, as a real gateway
//! puts it on its region's default bus. The documented event (S3 File Gateway User Guide, "Getting
//! notified about file operations" → "Getting refresh cache notification", the
//! example "Refresh cache notification"; awsdocs/amazon-s3-file-gateway-user-guide,
//! `doc_source/monitoring-file-gateway.md`) is:
//!
//! ```json
//! {"version": "0", "id": "...", "detail-type": "Storage Gateway Refresh Cache Event",
//!  "source": "aws.storagegateway", "account": "...", "time": "...", "region": "...",
//!  "resources": ["arn:aws:storagegateway:REGION:ACCOUNT:share/share-F123D451",
//!                "arn:aws:storagegateway:REGION:ACCOUNT:gateway/sgw-712345DA"],
//!  "detail": {"event-type": "refresh-complete",
//!             "notification-id": "<the NotificationId that RefreshCache returned>",
//!             "started": "2018-02-06T21:34:42Z", "completed": "2018-02-06T21:34:53Z",
//!             "folderList": ["/"]}}
//! ```
//!
//! The field table there: `started` is when the gateway received the request and the
//! refresh started, `completed` when the refresh finished, `folderList` the folders
//! refreshed (default `["/"]`). The CDK's generated schema for
//! `aws.storagegateway@StorageGatewayRefreshCacheEvent` has the same detail fields
//! (`event-type`, `notification-id`, `started`, `completed`, `folderList`); an older
//! edition of the guide showed `folderList` outside `detail`, which the current one
//! corrects. So the stand-in sends `Source` `aws.storagegateway`, `DetailType`
//! `Storage Gateway Refresh Cache Event`, `Resources` [share ARN, gateway ARN] (share
//! first, as documented), `Time` the completion, and `Detail` that object, with
//! millisecond timestamps (`2020-11-05T14:50:35.853Z`; the guide's examples have
//! whole seconds, and a reader must accept both). EventBridge (moto) adds `version`,
//! `id`, `time`, `region` (and, on AWS, `account`: moto 5.2.1's SQS targets leave it
//! out). The event goes to the gateway's own region unless [`CompletionEvents::region`]
//! says otherwise, on the default bus unless [`CompletionEvents::event_bus`] names
//! another. Delivery faults for tests: [`SgwStandIn::drop_next_completion_events`],
//! [`SgwStandIn::duplicate_next_completion_events`] and
//! [`SgwStandIn::set_gateway_first_in_events`] (`resources` in the other order), and
//! [`SgwStandIn::hold_refreshes_of`] (a share's refreshes never complete, so no event
//! comes). [`SgwStandIn::completion_events`] records every completion and what became
//! of its event.
//!
//! Besides the one-shot failures of [`SgwStandIn::fail_next`],
//! [`SgwStandIn::fail_refreshes_of`] makes every `RefreshCache` on one share fail
//! until it is cleared: a gateway that keeps failing while the others answer.
//!
//! # Strict limits
//!
//! The API reference asks callers to "wait at least 60 seconds between consecutive
//! RefreshCache API requests"; the real service does not enforce it. With
//! [`SgwStandIn::set_strict_limits`] the stand-in does: a call on a share less than
//! the minimum interval after the previous accepted call on that share gets an
//! `InvalidGatewayRequestException` that says so, and is counted in
//! [`SgwStandIn::interval_violations`], so that a test can assert that a client never
//! called too early.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::ops::{Add, AddAssign, Bound};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

pub use crate::bucket_model::{BucketModel, ObjectListing, LIST_PAGE_SIZE};

/// The `X-Amz-Target` prefix of every Storage Gateway operation.
pub const TARGET_PREFIX: &str = "StorageGateway_20130630.";
/// The content type of AWS JSON 1.1 requests and responses.
pub const JSON_CONTENT_TYPE: &str = "application/x-amz-json-1.1";
/// Default for [`SgwStandIn::set_max_page_size`].
pub const DEFAULT_MAX_PAGE_SIZE: usize = 100;
/// Default for [`SgwStandIn::set_refresh_duration`].
pub const DEFAULT_REFRESH_DURATION: Duration = Duration::from_millis(50);
/// Default for [`SgwStandIn::set_refresh_time_per_object`]: listing work adds nothing.
pub const DEFAULT_REFRESH_TIME_PER_OBJECT: Duration = Duration::ZERO;
/// "The gateway will accept no more than two refreshes at any time" (RefreshCache docs).
pub const MAX_REFRESHES_IN_FLIGHT: usize = 2;
/// The `source` of a refresh-complete event.
pub const REFRESH_EVENT_SOURCE: &str = "aws.storagegateway";
/// The `detail-type` of a refresh-complete event.
pub const REFRESH_EVENT_DETAIL_TYPE: &str = "Storage Gateway Refresh Cache Event";
/// The `detail.event-type` of a refresh-complete event.
pub const REFRESH_EVENT_TYPE: &str = "refresh-complete";
/// The `X-Amz-Target` prefix of EventBridge operations.
pub const EVENTBRIDGE_TARGET_PREFIX: &str = "AWSEvents.";

/// Account and region used in the ARNs that the stand-in makes up.
pub const ACCOUNT_ID: &str = "123456789012";
pub const REGION: &str = "us-east-1";

/// Timeout of one EventBridge request.
const EVENTBRIDGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request body accepted; the real service's limits are far above what the
/// four operations can legitimately need.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Model constraints from the Storage Gateway API (botocore `service-2.json`).
const MAX_DESCRIBE_ARNS: usize = 10; // FileShareARNList: min 1, max 10
const MAX_FOLDERS: usize = 50; // FolderList: min 1, max 50
const MAX_FOLDER_CHARS: usize = 1024; // Folder: min 1, max 1024
const MAX_LIST_LIMIT: i64 = 10_000; // ListFileShares Limit: 1..=10000 in this stand-in
const MAX_MARKER_CHARS: usize = 1000; // Marker: min 1, max 1000

/// The protocol of a file share.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShareKind {
    Nfs,
    Smb,
}

impl ShareKind {
    /// The `FileShareType` value on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ShareKind::Nfs => "NFS",
            ShareKind::Smb => "SMB",
        }
    }
}

/// A failure that [`SgwStandIn::fail_next`] makes the stand-in return instead of
/// running the operation. The operation has no effect (no refresh starts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectedFailure {
    /// HTTP 500 `InternalServerError` (errorCode `InternalError`). The SDK retries it.
    InternalError,
    /// HTTP 400 `InvalidGatewayRequestException`, identical to the answer at the
    /// two-refreshes-in-flight limit. The SDK does not retry it.
    Throttle,
    /// HTTP 503 `ServiceUnavailableError` (errorCode `ServiceUnavailable`). The SDK retries it.
    ServiceUnavailable,
}

/// One request as the stand-in saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedCall {
    /// The operation name from `X-Amz-Target` (without the `StorageGateway_20130630.`
    /// prefix), or the raw header value (possibly empty) when it has no such prefix.
    pub operation: String,
    /// The region the request went to: the SigV4 credential scope's region in its
    /// `Authorization` header, or [`REGION`] for an unsigned request.
    pub region: String,
    /// The parsed JSON body; `Value::Null` when the body was not valid JSON.
    pub body: Value,
    /// The HTTP status of the response.
    pub status: u16,
    /// The `__type` of the error response, if the call failed.
    pub error_type: Option<String>,
    /// Whether the response came from [`SgwStandIn::fail_next`].
    pub injected: bool,
    /// When the request was handled.
    pub at: SystemTime,
}

/// An accepted `RefreshCache` call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefreshRecord {
    pub share_arn: String,
    /// The folders as effectively applied: the request's `FolderList`, or `["/"]`.
    pub folder_list: Vec<String>,
    /// The request's `Recursive`, or `true`.
    pub recursive: bool,
    pub notification_id: String,
    pub started_at: SystemTime,
    /// The listing this refresh cost; zero when its bucket has no source.
    pub work: ListingWork,
    /// Why listing the bucket failed (S3 source only), for the first failed folder.
    pub listing_error: Option<String>,
}

/// Where the stand-in puts its refresh-complete events: an EventBridge endpoint (moto's)
/// that speaks JSON 1.1 (`X-Amz-Target: AWSEvents.PutEvents`). Requests carry an
/// unsigned `Authorization` header whose credential scope names the region and the
/// service `events` (moto routes on it) and `x-moto-account-id` for the account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompletionEvents {
    /// `http://host:port`.
    pub endpoint: String,
    /// The region whose default bus gets the events; `None`: the gateway's own region,
    /// as on AWS.
    pub region: Option<String>,
    /// The account whose bus gets the events (moto keeps one backend per account).
    pub account: String,
    /// The event bus (name or ARN); `None`: the default bus, as on AWS. A test stack on
    /// a moto server that other tests share uses a bus of its own, so that its rule
    /// does not also match the other stand-ins' events.
    pub event_bus: Option<String>,
}

impl CompletionEvents {
    /// Events to `endpoint`, in each gateway's region, for [`ACCOUNT_ID`].
    pub fn to(endpoint: &str) -> CompletionEvents {
        CompletionEvents {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            region: None,
            account: ACCOUNT_ID.to_string(),
            event_bus: None,
        }
    }

    /// The same, on the event bus `bus`.
    pub fn on_bus(mut self, bus: &str) -> CompletionEvents {
        self.event_bus = Some(bus.to_string());
        self
    }
}

/// A completed refresh, and what became of its refresh-complete event.
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionEvent {
    pub share_arn: String,
    pub gateway_arn: String,
    /// The `NotificationId` that `RefreshCache` returned.
    pub notification_id: String,
    /// As in the event: the refresh's effective `FolderList`.
    pub folder_list: Vec<String>,
    /// When the refresh was accepted.
    pub started: SystemTime,
    /// When it completed: its scheduled time, or when `complete_refreshes()` ran.
    pub completed: SystemTime,
    /// Whether [`SgwStandIn::complete_refreshes`] ended it before its time.
    pub forced: bool,
    /// `Resources` of the event: the share ARN, then the gateway ARN.
    pub resources: Vec<String>,
    /// `Detail` of the event, as a JSON object (sent as a string).
    pub detail: Value,
    /// The region whose bus the event went to; `None` when events were off.
    pub region: Option<String>,
    /// How many `PutEvents` calls the event gets: 0 (events off, or dropped), 1, or 2
    /// (duplicated).
    pub copies: u32,
    /// Dropped by [`SgwStandIn::drop_next_completion_events`].
    pub dropped: bool,
    /// The `EventId`s that EventBridge returned, one per copy put.
    pub event_ids: Vec<String>,
    /// Why a copy could not be put.
    pub errors: Vec<String>,
}

impl CompletionEvent {
    /// Every copy has been put or has failed.
    pub fn is_settled(&self) -> bool {
        self.event_ids.len() + self.errors.len() >= self.copies as usize
    }
}

/// Where the objects of a bucket live, for the cache model.
#[derive(Clone, Debug)]
pub enum BucketSource {
    /// An in-memory bucket that the test or benchmark mutates directly.
    Model(BucketModel),
    /// A real bucket (moto's S3), listed with `ListObjectsV2`.
    S3(aws_sdk_s3::Client),
}

/// Listing work done by refreshes: what the gateway asked of S3.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListingWork {
    /// Objects returned by listings; each stands for one HEAD the gateway makes.
    pub objects_listed: u64,
    /// Common prefixes (subfolders) returned by delimited listings.
    pub prefixes_listed: u64,
    /// `ListObjectsV2` requests (pages of up to 1000 entries).
    pub list_requests: u64,
}

impl ListingWork {
    fn of(listing: &ObjectListing) -> ListingWork {
        ListingWork {
            objects_listed: listing.objects.len() as u64,
            prefixes_listed: listing.prefixes.len() as u64,
            list_requests: listing.requests,
        }
    }
}

impl AddAssign for ListingWork {
    fn add_assign(&mut self, other: ListingWork) {
        self.objects_listed += other.objects_listed;
        self.prefixes_listed += other.prefixes_listed;
        self.list_requests += other.list_requests;
    }
}

impl Add for ListingWork {
    type Output = ListingWork;
    fn add(mut self, other: ListingWork) -> ListingWork {
        self += other;
        self
    }
}

/// The cached listing of one folder of a share.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct FolderListing {
    /// Names of the objects directly in the folder.
    objects: BTreeSet<String>,
    /// Names of the folder's direct subfolders.
    subfolders: BTreeSet<String>,
}

/// A share's cache: folder path relative to the share root ("" is the root, otherwise
/// "a/b") to its listing. A folder without an entry was never listed.
type ShareCache = BTreeMap<String, FolderListing>;

/// One folder of a refresh, resolved against the share's prefix.
#[derive(Clone, Debug)]
struct FolderJob {
    /// The folder as requested (`/` or `/a/b`), for error messages.
    folder: String,
    /// Relative to the share root: "" or "a/b".
    rel: String,
    /// The key prefix to list: the share's prefix plus `a/b/`.
    key_prefix: String,
    recursive: bool,
}

impl FolderJob {
    /// `folder` must have passed [`folder_problem`].
    fn new(share_prefix: &str, folder: &str, recursive: bool) -> FolderJob {
        let rel = folder.strip_prefix('/').unwrap_or(folder).to_string();
        let key_prefix = if rel.is_empty() {
            share_prefix.to_string()
        } else {
            format!("{share_prefix}{rel}/")
        };
        FolderJob {
            folder: folder.to_string(),
            rel,
            key_prefix,
            recursive,
        }
    }
}

/// The listing of one folder of a refresh. On error, `listing` holds the pages read
/// before the failure (they count as work) and is not applied.
struct FolderOutcome {
    job: FolderJob,
    listing: ObjectListing,
    error: Option<String>,
}

/// An accepted refresh whose S3 listing runs after the state lock is released.
struct PendingRefresh {
    share_arn: String,
    notification_id: String,
    bucket: String,
    client: aws_sdk_s3::Client,
    jobs: Vec<FolderJob>,
}

struct Gateway {
    arn: String,
    #[allow(dead_code)] // kept for debugging output; the API never returns it here
    name: String,
}

struct Share {
    /// Creation order; also the position that list markers refer to.
    seq: u64,
    arn: String,
    id: String,
    gateway_arn: String,
    kind: ShareKind,
    location_arn: String,
    /// Empty while the bucket has no source (or an S3 share is not primed yet).
    cache: ShareCache,
}

struct InFlight {
    share_arn: String,
    gateway_arn: String,
    notification_id: String,
    folder_list: Vec<String>,
    started_at: SystemTime,
    accepted: Instant,
    /// The duration settings when the refresh was accepted.
    base: Duration,
    per_object: Duration,
    /// The S3 listing is still running: the duration is not known yet.
    listing: bool,
    /// `None`: completes only through `complete_refreshes()`.
    done_at: Option<Instant>,
}

impl InFlight {
    /// Fixes the completion time once the listing work is known.
    fn schedule(&mut self, objects_listed: u64) {
        let per_object = self
            .per_object
            .checked_mul(u32::try_from(objects_listed).unwrap_or(u32::MAX));
        self.done_at = per_object
            .and_then(|extra| self.base.checked_add(extra))
            .and_then(|d| self.accepted.checked_add(d));
        self.listing = false;
    }

    fn due(&self, now: Instant) -> bool {
        !self.listing && self.done_at.is_some_and(|done| done <= now)
    }
}

/// One refresh-complete event to put on the bus.
struct Emission {
    notification_id: String,
    endpoint: String,
    region: String,
    account: String,
    entry: Value,
    copies: u32,
}

struct State {
    gateways: Vec<Gateway>,
    shares: Vec<Share>,
    next_id: u64,
    max_page_size: usize,
    refresh_duration: Duration,
    refresh_time_per_object: Duration,
    in_flight: Vec<InFlight>,
    refreshes: Vec<RefreshRecord>,
    rejected_refreshes: usize,
    /// `set_strict_limits`: the least time between accepted calls on one share.
    min_interval: Option<Duration>,
    /// When the last accepted `RefreshCache` on each share arrived.
    last_accepted: HashMap<String, Instant>,
    interval_violations: usize,
    completion_events: Option<CompletionEvents>,
    drop_events: u32,
    duplicate_events: u32,
    completions: Vec<CompletionEvent>,
    /// To the emitter task; `None` in unit tests that have no runtime.
    outbox: Option<UnboundedSender<Emission>>,
    /// Wakes the completion timer when a deadline is added.
    wake: Arc<Notify>,
    calls: Vec<RecordedCall>,
    failures: VecDeque<(String, InjectedFailure)>,
    /// `fail_refreshes_of`: every `RefreshCache` on these shares gets the failure.
    failing_shares: HashMap<String, InjectedFailure>,
    /// `hold_refreshes_of`: refreshes accepted on these shares never complete on
    /// their own.
    held_shares: BTreeSet<String>,
    /// `set_gateway_first_in_events`: `resources` lists the gateway, then the share.
    gateway_first_in_events: bool,
    /// Object sources by bucket name.
    sources: HashMap<String, BucketSource>,
    /// The bucket of each registered access point, by ARN and by alias.
    access_points: HashMap<String, String>,
    work_by_share: HashMap<String, ListingWork>,
    total_work: ListingWork,
    /// Per-instance secret, so that markers and ids are not guessable across instances.
    salt: u64,
}

impl State {
    fn new() -> State {
        State {
            gateways: Vec::new(),
            shares: Vec::new(),
            next_id: 1,
            max_page_size: DEFAULT_MAX_PAGE_SIZE,
            refresh_duration: DEFAULT_REFRESH_DURATION,
            refresh_time_per_object: DEFAULT_REFRESH_TIME_PER_OBJECT,
            in_flight: Vec::new(),
            refreshes: Vec::new(),
            rejected_refreshes: 0,
            min_interval: None,
            last_accepted: HashMap::new(),
            interval_violations: 0,
            completion_events: None,
            drop_events: 0,
            duplicate_events: 0,
            completions: Vec::new(),
            outbox: None,
            wake: Arc::new(Notify::new()),
            calls: Vec::new(),
            failures: VecDeque::new(),
            failing_shares: HashMap::new(),
            held_shares: BTreeSet::new(),
            gateway_first_in_events: false,
            sources: HashMap::new(),
            access_points: HashMap::new(),
            work_by_share: HashMap::new(),
            total_work: ListingWork::default(),
            salt: RandomState::new().hash_one(0x5347_5753_u64),
        }
    }

    /// A fresh number, unique within this instance.
    fn next(&mut self) -> u64 {
        let n = self.next_id;
        self.next_id += 1;
        n
    }

    /// An 8-hex-digit id that is unique within this instance: multiplying by an odd
    /// constant and xoring are both bijections on `u32`.
    fn short_id(&mut self) -> String {
        let n = self.next() as u32;
        format!("{:08X}", n.wrapping_mul(0x9E37_79B1) ^ (self.salt as u32))
    }

    fn tag(&self, seq: u64) -> u64 {
        let mut h = seq ^ self.salt;
        // splitmix64 finaliser
        h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h ^ (h >> 31)
    }

    /// An opaque marker meaning "continue after the share with this `seq`". Markers stay
    /// valid when shares are added or removed between pages.
    fn encode_marker(&self, seq: u64) -> String {
        format!("{:016x}{:016x}", seq, self.tag(seq))
    }

    fn decode_marker(&self, marker: &str) -> Option<u64> {
        if marker.len() != 32 || !marker.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let seq = u64::from_str_radix(marker.get(..16)?, 16).ok()?;
        let tag = u64::from_str_radix(marker.get(16..)?, 16).ok()?;
        (tag == self.tag(seq)).then_some(seq)
    }

    fn gateway_exists(&self, arn: &str) -> bool {
        self.gateways.iter().any(|g| g.arn == arn)
    }

    fn share(&self, arn: &str) -> Option<&Share> {
        self.shares.iter().find(|s| s.arn == arn)
    }

    /// The share as a request to `region` sees it: only shares of that region's
    /// gateways exist there.
    fn share_in(&self, region: &str, arn: &str) -> Option<&Share> {
        self.share(arn)
            .filter(|s| region_of(&s.gateway_arn) == region)
    }

    /// Completes the refreshes that are due by `now` (all of them when `force`), in
    /// the order of their completion times: each leaves the in-flight list, gets its
    /// completion record and, when events are on, its event queued for the bus.
    fn complete_due(&mut self, now: Instant, force: bool) {
        if !self.in_flight.iter().any(|r| force || r.due(now)) {
            return;
        }
        let (mut done, rest): (Vec<InFlight>, Vec<InFlight>) = std::mem::take(&mut self.in_flight)
            .into_iter()
            .partition(|r| force || r.due(now));
        self.in_flight = rest;
        // Stable: refreshes due at the same instant keep their acceptance order.
        done.sort_by_key(|r| r.done_at.filter(|d| *d <= now).unwrap_or(now));
        for refresh in done {
            self.complete(refresh, now);
        }
    }

    fn complete(&mut self, refresh: InFlight, now: Instant) {
        let (at, forced) = match refresh.done_at {
            Some(done) if done <= now => (done, false),
            _ => (now, true),
        };
        let completed = refresh.started_at + at.saturating_duration_since(refresh.accepted);
        let detail = json!({
            "event-type": REFRESH_EVENT_TYPE,
            "notification-id": refresh.notification_id,
            "started": rfc3339_millis(refresh.started_at),
            "completed": rfc3339_millis(completed),
            "folderList": refresh.folder_list,
        });
        let resources = if self.gateway_first_in_events {
            vec![refresh.gateway_arn.clone(), refresh.share_arn.clone()]
        } else {
            vec![refresh.share_arn.clone(), refresh.gateway_arn.clone()]
        };
        let mut record = CompletionEvent {
            share_arn: refresh.share_arn,
            gateway_arn: refresh.gateway_arn,
            notification_id: refresh.notification_id,
            folder_list: refresh.folder_list,
            started: refresh.started_at,
            completed,
            forced,
            resources,
            detail,
            region: None,
            copies: 0,
            dropped: false,
            event_ids: Vec::new(),
            errors: Vec::new(),
        };
        if let Some(config) = self.completion_events.clone() {
            let region = config
                .region
                .clone()
                .unwrap_or_else(|| region_of(&record.gateway_arn).to_string());
            record.region = Some(region.clone());
            if self.drop_events > 0 {
                self.drop_events -= 1;
                record.dropped = true;
            } else {
                record.copies = if self.duplicate_events > 0 {
                    self.duplicate_events -= 1;
                    2
                } else {
                    1
                };
                let emission = Emission {
                    notification_id: record.notification_id.clone(),
                    endpoint: config.endpoint,
                    region,
                    account: config.account,
                    entry: put_events_entry(&record, config.event_bus.as_deref()),
                    copies: record.copies,
                };
                let sent = self
                    .outbox
                    .as_ref()
                    .is_some_and(|outbox| outbox.send(emission).is_ok());
                if !sent {
                    record
                        .errors
                        .push("the stand-in's event emitter is not running".to_string());
                }
            }
        }
        self.completions.push(record);
    }

    /// The earliest scheduled completion, for the timer.
    fn next_deadline(&self) -> Option<Instant> {
        self.in_flight
            .iter()
            .filter(|r| !r.listing)
            .filter_map(|r| r.done_at)
            .min()
    }

    fn in_flight_for(&mut self, share_arn: &str) -> usize {
        self.complete_due(Instant::now(), false);
        self.in_flight
            .iter()
            .filter(|r| r.share_arn == share_arn)
            .count()
    }

    fn notification_id(&mut self) -> String {
        let n = self.next();
        let a = self.tag(n);
        let b = self.tag(n ^ 0xA5A5_A5A5_A5A5_A5A5);
        // UUID-shaped; `n` in the last group keeps it unique.
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            (a >> 32) as u32,
            (a >> 16) as u16,
            (a as u16) & 0x0fff,
            ((b >> 48) as u16 & 0x3fff) | 0x8000,
            n & 0xffff_ffff_ffff
        )
    }
}

/// An error response.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    type_name: &'static str,
    message: Option<String>,
    /// `Some((errorCode, errorDetails))`: the Storage Gateway `error` object.
    sgw_error: Option<(&'static str, Vec<(&'static str, String)>)>,
}

impl ApiError {
    /// A model constraint failed. The service framework checks length/range traits
    /// before the operation runs and answers `ValidationException` with this wording.
    fn validation(message: String) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            type_name: "ValidationException",
            message: Some(format!("1 validation error detected: {message}")),
            sgw_error: None,
        }
    }

    fn not_null(member: &str) -> ApiError {
        ApiError::validation(format!(
            "Value null at '{member}' failed to satisfy constraint: Member must not be null"
        ))
    }

    fn serialization(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            type_name: "SerializationException",
            message: Some(message.into()),
            sgw_error: None,
        }
    }

    fn unknown_operation() -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            type_name: "UnknownOperationException",
            message: None,
            sgw_error: None,
        }
    }

    fn invalid_request(
        code: &'static str,
        message: impl Into<String>,
        details: Vec<(&'static str, String)>,
    ) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            type_name: "InvalidGatewayRequestException",
            message: Some(message.into()),
            sgw_error: Some((code, details)),
        }
    }

    /// The real service answers "The specified gateway was not found." with errorCode
    /// `GatewayNotFound` (both are what Terraform's AWS provider matches on).
    fn gateway_not_found(arn: &str) -> ApiError {
        ApiError::invalid_request(
            "GatewayNotFound",
            "The specified gateway was not found.",
            vec![("gatewayArn", arn.to_string())],
        )
    }

    /// The real service answers "The specified file share was not found." with errorCode
    /// `FileShareNotFound` (an operation error code that the SDK's `ErrorCode` enum does
    /// not list, so it arrives as `ErrorCode::Unknown`; `as_str()` gives the code).
    fn share_not_found(arn: &str) -> ApiError {
        ApiError::invalid_request(
            "FileShareNotFound",
            "The specified file share was not found.",
            vec![("fileShareArn", arn.to_string())],
        )
    }

    /// The answer to a third RefreshCache while two are in flight. The API reference
    /// only says that it is an `InvalidGatewayRequestException` "because too many
    /// requests were sent to the server"; the exact message and errorCode are not
    /// documented, so this wording and the code `ServiceUnavailable` (a busy gateway;
    /// retry later) are the stand-in's choice. Clients should key on the exception type
    /// and not on the errorCode `FileShareNotFound`/`GatewayNotFound`.
    fn too_many_refreshes(share_arn: &str) -> ApiError {
        ApiError::invalid_request(
            "ServiceUnavailable",
            "The specified gateway is busy: too many requests were sent to the server. \
             A file share accepts at most two RefreshCache operations at a time.",
            vec![("fileShareArn", share_arn.to_string())],
        )
    }

    /// Strict mode's answer to a call that came too soon after the previous accepted
    /// call on the share (the real service does not reject these; see the module docs).
    fn too_soon(share_arn: &str, since: Duration, min_interval: Duration) -> ApiError {
        ApiError::invalid_request(
            "ServiceUnavailable",
            format!(
                "RefreshCache was called on this file share {:.3} s after the previous \
                 accepted call; wait at least {:.3} s between consecutive RefreshCache \
                 calls on one file share (strict limits).",
                since.as_secs_f64(),
                min_interval.as_secs_f64()
            ),
            vec![("fileShareArn", share_arn.to_string())],
        )
    }

    fn internal_error() -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            type_name: "InternalServerError",
            message: Some("An internal error has occurred. Please try again.".into()),
            sgw_error: Some(("InternalError", Vec::new())),
        }
    }

    fn service_unavailable() -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            type_name: "ServiceUnavailableError",
            message: Some("The service is temporarily unavailable. Please try again.".into()),
            sgw_error: Some(("ServiceUnavailable", Vec::new())),
        }
    }

    fn body(&self) -> Value {
        let mut body = Map::new();
        body.insert("__type".into(), Value::String(self.type_name.into()));
        if let Some(message) = &self.message {
            body.insert("message".into(), Value::String(message.clone()));
        }
        if let Some((code, details)) = &self.sgw_error {
            let mut error = Map::new();
            error.insert("errorCode".into(), Value::String((*code).into()));
            let details: Map<String, Value> = details
                .iter()
                .map(|(k, v)| ((*k).to_string(), Value::String(v.clone())))
                .collect();
            error.insert("errorDetails".into(), Value::Object(details));
            body.insert("error".into(), Value::Object(error));
        }
        Value::Object(body)
    }
}

/// The Storage Gateway stand-in. Dropping it stops the server and its connections.
pub struct SgwStandIn {
    state: Arc<Mutex<State>>,
    server: JoinHandle<()>,
    /// Completes refreshes when they are due.
    timer: JoinHandle<()>,
    /// Puts refresh-complete events on the bus, in completion order.
    emitter: JoinHandle<()>,
    addr: SocketAddr,
}

impl Drop for SgwStandIn {
    fn drop(&mut self) {
        self.server.abort();
        self.timer.abort();
        self.emitter.abort();
    }
}

impl SgwStandIn {
    /// Binds `127.0.0.1:0` and serves on a tokio task.
    pub async fn start() -> std::io::Result<SgwStandIn> {
        SgwStandIn::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Binds `addr` and serves on a tokio task.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<SgwStandIn> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (outbox, events) = unbounded_channel();
        let mut st = State::new();
        st.outbox = Some(outbox);
        let wake = st.wake.clone();
        let state = Arc::new(Mutex::new(st));
        let server = tokio::spawn(serve(listener, state.clone()));
        let timer = tokio::spawn(run_timer(state.clone(), wake));
        let emitter = tokio::spawn(run_emitter(state.clone(), events));
        Ok(SgwStandIn {
            state,
            server,
            timer,
            emitter,
            addr,
        })
    }

    /// `http://127.0.0.1:PORT`, for the SDK's `endpoint_url`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Adds a gateway in [`REGION`]; returns its ARN
    /// (`arn:aws:storagegateway:us-east-1:123456789012:gateway/sgw-XXXXXXXX`).
    pub fn add_gateway(&self, name: &str) -> String {
        self.add_gateway_in(REGION, name)
    }

    /// Adds a gateway in `region`; returns its ARN
    /// (`arn:aws:storagegateway:REGION:123456789012:gateway/sgw-XXXXXXXX`). Only
    /// requests signed for `region` see it and its shares.
    pub fn add_gateway_in(&self, region: &str, name: &str) -> String {
        let mut st = self.state();
        let arn = format!(
            "arn:aws:storagegateway:{region}:{ACCOUNT_ID}:gateway/sgw-{}",
            st.short_id()
        );
        st.gateways.push(Gateway {
            arn: arn.clone(),
            name: name.to_string(),
        });
        arn
    }

    /// Adds a share on `gateway_arn` (registered implicitly if unknown) for
    /// `location_arn` (`arn:aws:s3:::bucket` or `arn:aws:s3:::bucket/prefix/`, or an
    /// access point ARN or alias, see [`SgwStandIn::add_access_point`]); returns
    /// its ARN (`arn:aws:storagegateway:REGION:123456789012:share/share-XXXXXXXX`, in
    /// the gateway's region).
    pub fn add_share(&self, gateway_arn: &str, kind: ShareKind, location_arn: &str) -> String {
        let mut st = self.state();
        if !st.gateway_exists(gateway_arn) {
            st.gateways.push(Gateway {
                arn: gateway_arn.to_string(),
                name: String::new(),
            });
        }
        let id = format!("share-{}", st.short_id());
        let region = region_of(gateway_arn);
        let arn = format!("arn:aws:storagegateway:{region}:{ACCOUNT_ID}:share/{id}");
        let seq = st.next();
        let mut share = Share {
            seq,
            arn: arn.clone(),
            id,
            gateway_arn: gateway_arn.to_string(),
            kind,
            location_arn: location_arn.to_string(),
            cache: ShareCache::new(),
        };
        // A share created on a modelled bucket starts with the bucket as it is now.
        if let Some(BucketSource::Model(model)) =
            bucket_in(&st.access_points, location_arn).and_then(|b| st.sources.get(&b))
        {
            snapshot_from_model(&mut share, model);
        }
        st.shares.push(share);
        arn
    }

    /// Tells the stand-in that the access point `arn`
    /// (`arn:aws:s3:REGION:ACCOUNT:accesspoint/NAME`), alias `alias`, belongs to
    /// `bucket`, as S3 Control says (a test that creates the access point in moto
    /// registers what `CreateAccessPoint` answered). Shares whose `LocationARN` is the
    /// access point ARN (with or without a prefix) or the alias
    /// (`arn:aws:s3:::ALIAS[/prefix/]`) then see `bucket` in the cache model, as a real
    /// gateway does. An access point that is not registered maps no bucket.
    pub fn add_access_point(&self, arn: &str, alias: &str, bucket: &str) {
        let mut st = self.state();
        st.access_points.insert(arn.to_string(), bucket.to_string());
        st.access_points
            .insert(alias.to_string(), bucket.to_string());
    }

    /// Removes a share; `false` if there was none with that ARN.
    pub fn remove_share(&self, share_arn: &str) -> bool {
        let mut st = self.state();
        let before = st.shares.len();
        st.shares.retain(|s| s.arn != share_arn);
        // A share that is gone completes nothing and emits no event.
        st.in_flight.retain(|r| r.share_arn != share_arn);
        st.last_accepted.remove(share_arn);
        st.shares.len() != before
    }

    /// The largest `ListFileShares` page (default 100; 0 is treated as 1).
    pub fn set_max_page_size(&self, n: usize) {
        self.state().max_page_size = n.max(1);
    }

    /// The base of how long a refresh stays in flight (default 50 ms); see
    /// [`SgwStandIn::set_refresh_time_per_object`] for the rest. Applies to refreshes
    /// started afterwards. `Duration::MAX` means "until `complete_refreshes()`".
    pub fn set_refresh_duration(&self, d: Duration) {
        self.state().refresh_duration = d;
    }

    /// What each object that a refresh lists adds to its duration (default zero): a
    /// refresh completes `base + per_object × objects listed` after it was accepted
    /// ([`ListingWork::objects_listed`]; a bucket without a source lists nothing).
    /// Applies to refreshes started afterwards.
    pub fn set_refresh_time_per_object(&self, per_object: Duration) {
        self.state().refresh_time_per_object = per_object;
    }

    /// Finishes every in-flight refresh now (each gets its completion record and, when
    /// events are on, its event), including one whose S3 listing is still running.
    pub fn complete_refreshes(&self) {
        self.state().complete_due(Instant::now(), true);
    }

    /// Strict limits: with `Some(min_interval)`, a `RefreshCache` on a share less than
    /// `min_interval` after the previous accepted call on that share is rejected with
    /// `InvalidGatewayRequestException` and counted in
    /// [`SgwStandIn::interval_violations`]. `None` (the default) turns it off. The limit
    /// of two refreshes in flight holds either way.
    pub fn set_strict_limits(&self, min_interval: Option<Duration>) {
        self.state().min_interval = min_interval;
    }

    /// Calls rejected by strict mode for coming too soon (a call that also met the
    /// in-flight limit counts here and in [`SgwStandIn::rejected_refreshes`]).
    pub fn interval_violations(&self) -> usize {
        self.state().interval_violations
    }

    /// Where refresh-complete events go; `None` (the default) emits none. Applies to
    /// refreshes that complete afterwards. Completions are recorded either way.
    pub fn set_completion_events(&self, config: Option<CompletionEvents>) {
        self.state().completion_events = config;
    }

    /// The events of the next `count` completions (while events are on) are lost: not
    /// put on the bus at all. Repeated calls add up.
    pub fn drop_next_completion_events(&self, count: u32) {
        self.state().drop_events += count;
    }

    /// The events of the next `count` completions (while events are on, after any
    /// drops) are put on the bus twice: two `PutEvents` calls with the same entry, so
    /// the copies share the `notification-id` and have different EventBridge ids.
    /// Repeated calls add up.
    pub fn duplicate_next_completion_events(&self, count: u32) {
        self.state().duplicate_events += count;
    }

    /// Every completion so far, in completion order, with what became of its event.
    pub fn completion_events(&self) -> Vec<CompletionEvent> {
        let mut st = self.state();
        st.complete_due(Instant::now(), false);
        st.completions.clone()
    }

    /// Waits until at least `count` refreshes have completed and every completion's
    /// event has been put (or failed), or `timeout` passed; returns the completions.
    pub async fn wait_for_completion_events(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Vec<CompletionEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.completion_events();
            if (events.len() >= count && events.iter().all(CompletionEvent::is_settled))
                || Instant::now() >= deadline
            {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Refreshes of `share_arn` still in flight.
    pub fn in_flight_refreshes(&self, share_arn: &str) -> usize {
        self.state().in_flight_for(share_arn)
    }

    /// The next `count` calls to `operation` (e.g. `"RefreshCache"`) get `failure`
    /// instead of running. Repeated calls queue up behind each other.
    pub fn fail_next(&self, operation: &str, count: u32, failure: InjectedFailure) {
        let mut st = self.state();
        for _ in 0..count {
            st.failures.push_back((operation.to_string(), failure));
        }
    }

    /// Every `RefreshCache` on `share_arn` gets `failure` instead of running (recorded
    /// with `injected`, no refresh starts), until [`SgwStandIn::clear_refresh_failures_of`]:
    /// a gateway that keeps failing one share's calls while its other shares, and other
    /// gateways, answer normally. Failures queued with [`SgwStandIn::fail_next`] come
    /// first.
    pub fn fail_refreshes_of(&self, share_arn: &str, failure: InjectedFailure) {
        self.state()
            .failing_shares
            .insert(share_arn.to_string(), failure);
    }

    /// Ends [`SgwStandIn::fail_refreshes_of`] for `share_arn`.
    pub fn clear_refresh_failures_of(&self, share_arn: &str) {
        self.state().failing_shares.remove(share_arn);
    }

    /// With `true`, refreshes accepted on `share_arn` from now on stay in flight until
    /// [`SgwStandIn::complete_refreshes`] (the gateway restarted mid-refresh: the call
    /// was accepted, and no completion event ever comes); they count towards the
    /// share's two in flight. `false` applies to refreshes accepted afterwards.
    pub fn hold_refreshes_of(&self, share_arn: &str, hold: bool) {
        let mut st = self.state();
        if hold {
            st.held_shares.insert(share_arn.to_string());
        } else {
            st.held_shares.remove(share_arn);
        }
    }

    /// With `true`, the `resources` of the refresh-complete events of refreshes that
    /// complete from now on list the gateway's ARN before the share's (the documented
    /// example lists the share first; nothing promises that order).
    pub fn set_gateway_first_in_events(&self, gateway_first: bool) {
        self.state().gateway_first_in_events = gateway_first;
    }

    /// Every request so far, in arrival order.
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.state().calls.clone()
    }

    /// How many requests named `operation`, failed ones included.
    pub fn calls_to(&self, operation: &str) -> usize {
        self.state()
            .calls
            .iter()
            .filter(|c| c.operation == operation)
            .count()
    }

    /// Every `RefreshCache` request on `share_arn`, failed ones included, in order.
    pub fn refresh_calls_on(&self, share_arn: &str) -> Vec<RecordedCall> {
        self.state()
            .calls
            .iter()
            .filter(|c| c.operation == "RefreshCache" && c.body["FileShareARN"] == share_arn)
            .cloned()
            .collect()
    }

    /// Accepted `RefreshCache` calls, in order.
    pub fn refreshes(&self) -> Vec<RefreshRecord> {
        self.state().refreshes.clone()
    }

    /// `RefreshCache` calls answered with the in-flight-limit error (real or injected
    /// with [`InjectedFailure::Throttle`]).
    pub fn rejected_refreshes(&self) -> usize {
        self.state().rejected_refreshes
    }

    /// Forgets the recorded calls, the refresh records, the completion records and the
    /// rejected and interval-violation counts. Shares, refreshes in flight (and the
    /// time of each share's last accepted call), settings, queued failures and event
    /// faults, share caches and the listing work counters stay (see
    /// [`SgwStandIn::reset_listing_work`]).
    pub fn reset_calls(&self) {
        let mut st = self.state();
        st.calls.clear();
        st.refreshes.clear();
        st.rejected_refreshes = 0;
        st.interval_violations = 0;
        st.completions.clear();
    }

    /// Gives `bucket` an object source, which turns on the cache model for its shares.
    /// The caches of the bucket's existing shares start over: as a snapshot of the
    /// bucket for a [`BucketSource::Model`], and empty (nothing listed yet) for
    /// [`BucketSource::S3`] until [`SgwStandIn::prime_share_cache`] or a refresh.
    pub fn set_bucket_source(&self, bucket: &str, source: BucketSource) {
        let mut st = self.state();
        let st = &mut *st;
        let access_points = &st.access_points;
        for share in st
            .shares
            .iter_mut()
            .filter(|s| bucket_in(access_points, &s.location_arn).as_deref() == Some(bucket))
        {
            share.cache.clear();
            if let BucketSource::Model(model) = &source {
                snapshot_from_model(share, model);
            }
        }
        st.sources.insert(bucket.to_string(), source);
    }

    /// Removes `bucket`'s source (and so the cache model of its shares).
    pub fn clear_bucket_source(&self, bucket: &str) {
        let mut st = self.state();
        let st = &mut *st;
        st.sources.remove(bucket);
        let access_points = &st.access_points;
        for share in st
            .shares
            .iter_mut()
            .filter(|s| bucket_in(access_points, &s.location_arn).as_deref() == Some(bucket))
        {
            share.cache.clear();
        }
    }

    /// Replaces the share's cache with a full snapshot of its bucket under its prefix,
    /// as when the share is created. Not counted as listing work. Fails when the share
    /// is unknown, its bucket has no source, or S3 cannot be listed.
    pub async fn prime_share_cache(&self, share_arn: &str) -> Result<(), String> {
        let (source, bucket, prefix) = {
            let st = self.state();
            let share = st
                .share(share_arn)
                .ok_or_else(|| format!("no share {share_arn}"))?;
            let bucket = bucket_in(&st.access_points, &share.location_arn)
                .ok_or_else(|| format!("share {share_arn} has no S3 location"))?;
            let source = st
                .sources
                .get(&bucket)
                .cloned()
                .ok_or_else(|| format!("bucket {bucket} has no object source"))?;
            (source, bucket, prefix_of(&share.location_arn))
        };
        let listing = match source {
            BucketSource::Model(model) => model.list(&prefix, false),
            BucketSource::S3(client) => match list_s3(&client, &bucket, &prefix, false).await {
                (listing, None) => listing,
                (_, Some(error)) => return Err(error),
            },
        };
        let mut st = self.state();
        let share = st
            .shares
            .iter_mut()
            .find(|s| s.arn == share_arn)
            .ok_or_else(|| format!("share {share_arn} was removed while priming"))?;
        share.cache.clear();
        apply_listing(
            &mut share.cache,
            &FolderJob::new(&prefix, "/", true),
            &listing,
        );
        Ok(())
    }

    /// The object keys (bucket key form: share prefix plus relative path) that a client
    /// of the share can reach through its cached listings. Empty for an unknown share
    /// or one without a cache model.
    pub fn share_view(&self, share_arn: &str) -> BTreeSet<String> {
        let st = self.state();
        st.share(share_arn)
            .map(|s| view_of(s).0)
            .unwrap_or_default()
    }

    /// The folders a client of the share can reach, as key prefixes ending in `/`
    /// (`data/a/b/`), the share root excluded. A folder whose listing was never loaded
    /// is included: the client sees it, empty.
    pub fn share_folders_view(&self, share_arn: &str) -> BTreeSet<String> {
        let st = self.state();
        st.share(share_arn)
            .map(|s| view_of(s).1)
            .unwrap_or_default()
    }

    /// The listing work of the refreshes of `share_arn` since the last
    /// [`SgwStandIn::reset_listing_work`].
    pub fn listing_work(&self, share_arn: &str) -> ListingWork {
        self.state()
            .work_by_share
            .get(share_arn)
            .copied()
            .unwrap_or_default()
    }

    /// The listing work of all refreshes since the last reset.
    pub fn total_listing_work(&self) -> ListingWork {
        self.state().total_work
    }

    /// Zeroes the per-share and total listing work counters (refresh records keep
    /// their own counts until [`SgwStandIn::reset_calls`]).
    pub fn reset_listing_work(&self) {
        let mut st = self.state();
        st.work_by_share.clear();
        st.total_work = ListingWork::default();
    }
}

/// The region of a Storage Gateway ARN (`arn:aws:storagegateway:REGION:...`);
/// [`REGION`] for anything else (a test may name a gateway by a made-up string).
fn region_of(arn: &str) -> &str {
    match arn.split(':').collect::<Vec<_>>().as_slice() {
        ["arn", _, "storagegateway", region, ..] if !region.is_empty() => region,
        _ => REGION,
    }
}

/// The region a request is for: the region of the SigV4 credential scope
/// (`Credential=AKID/DATE/REGION/SERVICE/aws4_request`) in the `Authorization`
/// header, or [`REGION`] when the request is not signed that way.
fn request_region(headers: &hyper::HeaderMap) -> String {
    headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(credential_scope_region)
        .unwrap_or(REGION)
        .to_string()
}

fn credential_scope_region(authorization: &str) -> Option<&str> {
    let (_, credential) = authorization.split_once("Credential=")?;
    let scope = credential.split([',', ' ']).next()?;
    // AKID/DATE/REGION/SERVICE/aws4_request
    let parts: Vec<&str> = scope.split('/').collect();
    match parts.as_slice() {
        [_, _, region, _, "aws4_request"] if !region.is_empty() => Some(region),
        _ => None,
    }
}

/// Locks the state; a panic elsewhere while holding the lock must not take the
/// stand-in down, so poisoning is ignored.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Completes refreshes when they are due: sleeps until the earliest completion time,
/// or until a new refresh wakes it.
async fn run_timer(state: Arc<Mutex<State>>, wake: Arc<Notify>) {
    loop {
        let next = {
            let mut st = lock(&state);
            st.complete_due(Instant::now(), false);
            st.next_deadline()
        };
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

/// Puts queued refresh-complete events on the bus, one `PutEvents` per copy, in
/// completion order, and records the outcome.
async fn run_emitter(state: Arc<Mutex<State>>, mut events: UnboundedReceiver<Emission>) {
    while let Some(emission) = events.recv().await {
        for _ in 0..emission.copies {
            let outcome = put_event(&emission).await;
            if let Err(error) = &outcome {
                tracing::warn!(%error, notification_id = %emission.notification_id,
                    "sgw stand-in: could not put a refresh-complete event");
            }
            let mut st = lock(&state);
            // Gone if reset_calls() ran in between.
            if let Some(record) = st
                .completions
                .iter_mut()
                .rev()
                .find(|c| c.notification_id == emission.notification_id)
            {
                match outcome {
                    Ok(id) => record.event_ids.push(id),
                    Err(error) => record.errors.push(error),
                }
            }
        }
    }
}

/// The `PutEvents` entry of a completion.
fn put_events_entry(record: &CompletionEvent, event_bus: Option<&str>) -> Value {
    let time = record
        .completed
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let mut entry = json!({
        "Source": REFRESH_EVENT_SOURCE,
        "DetailType": REFRESH_EVENT_DETAIL_TYPE,
        "Resources": record.resources,
        "Detail": record.detail.to_string(),
        "Time": time,
    });
    if let (Some(bus), Value::Object(map)) = (event_bus, &mut entry) {
        map.insert("EventBusName".into(), Value::String(bus.to_string()));
    }
    entry
}

/// One `PutEvents` with one entry; the `EventId` EventBridge gave it.
async fn put_event(emission: &Emission) -> Result<String, String> {
    let output = eventbridge_call(
        &emission.endpoint,
        &emission.region,
        &emission.account,
        "PutEvents",
        &json!({ "Entries": [emission.entry] }),
    )
    .await?;
    let entry = output
        .get("Entries")
        .and_then(Value::as_array)
        .and_then(|entries| entries.first());
    match entry.and_then(|e| e.get("EventId")).and_then(Value::as_str) {
        Some(id) if output.get("FailedEntryCount").and_then(Value::as_u64) == Some(0) => {
            Ok(id.to_string())
        }
        _ => Err(format!("PutEvents did not accept the entry: {output}")),
    }
}

/// One EventBridge call (AWS JSON 1.1, `X-Amz-Target: AWSEvents.<operation>`) to
/// `endpoint` (`http://host:port`, moto's), for `region` and `account`; the output
/// JSON. The request is not signed: its `Authorization` header only carries the
/// credential scope (`.../REGION/events/aws4_request`), from which moto takes the
/// service and the region, and `x-moto-account-id` names the account.
pub async fn eventbridge_call(
    endpoint: &str,
    region: &str,
    account: &str,
    operation: &str,
    input: &Value,
) -> Result<Value, String> {
    let authority = endpoint
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .filter(|authority| !authority.is_empty())
        .ok_or_else(|| {
            format!("EventBridge endpoint {endpoint:?} is not an http://host:port URL")
        })?;
    let target = format!("{EVENTBRIDGE_TARGET_PREFIX}{operation}");
    let date = rfc3339_millis(SystemTime::now())
        .get(..10)
        .unwrap_or("1970-01-01")
        .replace('-', "");
    let authorization = format!(
        "AWS4-HMAC-SHA256 Credential=test/{date}/{region}/events/aws4_request, \
         SignedHeaders=content-type;host;x-amz-target, Signature=0"
    );
    let body = input.to_string();
    let response = crate::runtime_api::http_request_timeout(
        authority,
        "POST",
        "/",
        &[
            ("content-type", JSON_CONTENT_TYPE),
            ("x-amz-target", &target),
            ("authorization", &authorization),
            ("x-moto-account-id", account),
        ],
        body.as_bytes(),
        EVENTBRIDGE_TIMEOUT,
    )
    .await
    .map_err(|e| format!("EventBridge {operation}: {e}"))?;
    if response.status != 200 {
        return Err(format!(
            "EventBridge {operation} answered HTTP {}: {}",
            response.status,
            response.text()
        ));
    }
    // Operations without output (DeleteRule) answer with an empty body.
    if response.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    response
        .json()
        .map_err(|e| format!("EventBridge {operation}: {e}"))
}

/// `2020-11-05T14:50:40.056Z` (UTC, milliseconds): the form of `started` and
/// `completed` in the stand-in's refresh-complete events.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let since_epoch = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let in_day = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / 3600,
        in_day % 3600 / 60,
        in_day % 60,
        since_epoch.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day number (days since 1970-01-01); Howard
/// Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

async fn serve(listener: TcpListener, state: Arc<Mutex<State>>) {
    // Connections live in this JoinSet, so aborting the server task ends them too.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let state = state.clone();
                    connections.spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(handle(&state, req).await) }
                        });
                        // HTTP/1.1 with keep-alive (hyper's default).
                        if let Err(e) = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                        {
                            tracing::debug!(error = %e, "sgw stand-in: connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // e.g. too many open files: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "sgw stand-in: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn handle(state: &Mutex<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let target = req
        .headers()
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let region = request_region(req.headers());
    let method_ok = req.method() == Method::POST;

    let raw = Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map(|collected| collected.to_bytes());

    let (status, payload, request_id, pending) = answer(state, &target, &region, method_ok, raw);
    // An S3 listing is awaited without the lock, then applied, before the answer goes
    // out: once a client sees success, the share's view reflects the refresh.
    if let Some(pending) = pending {
        run_pending(state, pending).await;
    }

    let mut response = Response::new(Full::new(Bytes::from(payload.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(JSON_CONTENT_TYPE));
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert("x-amzn-requestid", v);
    }
    response
}

/// Runs one request under the state lock and records it. Returns the status, the JSON
/// body, the request id and an accepted refresh's S3 listing still to run.
fn answer<E>(
    state: &Mutex<State>,
    target: &str,
    region: &str,
    method_ok: bool,
    raw: Result<Bytes, E>,
) -> (StatusCode, Value, String, Option<PendingRefresh>) {
    let operation = target
        .strip_prefix(TARGET_PREFIX)
        .unwrap_or(target)
        .to_string();
    let mut pending = None;
    let mut st = lock(state);
    let (result, body, injected) = match raw {
        Err(_) => (
            Err(ApiError::serialization(
                "The request body could not be read.",
            )),
            Value::Null,
            false,
        ),
        Ok(raw) => {
            // The SDK always sends `{}` for an empty input; an empty body is read the same way.
            let parsed: Result<Value, _> = if raw.iter().all(u8::is_ascii_whitespace) {
                Ok(Value::Object(Map::new()))
            } else {
                serde_json::from_slice(&raw)
            };
            let body = parsed.as_ref().cloned().unwrap_or(Value::Null);
            if !method_ok || !target.starts_with(TARGET_PREFIX) {
                (Err(ApiError::unknown_operation()), body, false)
            } else if let Some(failure) =
                take_failure(&mut st, &operation).or_else(|| share_failure(&st, &operation, &body))
            {
                if failure == InjectedFailure::Throttle && operation == "RefreshCache" {
                    st.rejected_refreshes += 1;
                }
                let share = body
                    .get("FileShareARN")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let error = match failure {
                    InjectedFailure::InternalError => ApiError::internal_error(),
                    InjectedFailure::ServiceUnavailable => ApiError::service_unavailable(),
                    InjectedFailure::Throttle => ApiError::too_many_refreshes(&share),
                };
                (Err(error), body, true)
            } else {
                let result = match parsed {
                    Err(e) => Err(ApiError::serialization(format!(
                        "The request body is not valid JSON: {e}"
                    ))),
                    Ok(Value::Object(input)) => {
                        dispatch(&mut st, &operation, region, &input, &mut pending)
                    }
                    Ok(_) => Err(ApiError::serialization(
                        "The request body must be a JSON object.",
                    )),
                };
                (result, body, false)
            }
        }
    };

    let (status, payload) = match &result {
        Ok(output) => (StatusCode::OK, output.clone()),
        Err(error) => (error.status, error.body()),
    };
    st.calls.push(RecordedCall {
        operation,
        region: region.to_string(),
        body,
        status: status.as_u16(),
        error_type: result.as_ref().err().map(|e| e.type_name.to_string()),
        injected,
        at: SystemTime::now(),
    });
    let request_id = st.notification_id();
    (status, payload, request_id, pending)
}

/// Lists S3 for an accepted refresh (without the lock) and applies the result.
async fn run_pending(state: &Mutex<State>, pending: PendingRefresh) {
    let mut outcomes = Vec::with_capacity(pending.jobs.len());
    for job in pending.jobs {
        let (listing, error) = list_s3(
            &pending.client,
            &pending.bucket,
            &job.key_prefix,
            !job.recursive,
        )
        .await;
        outcomes.push(FolderOutcome {
            job,
            listing,
            error,
        });
    }
    let mut st = lock(state);
    finish_refresh(
        &mut st,
        &pending.share_arn,
        &pending.notification_id,
        outcomes,
    );
}

/// `ListObjectsV2` of `prefix` in `bucket`, every page, with the delimiter `/` when
/// `delimited`. On failure, returns what was read so far and the error.
async fn list_s3(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    delimited: bool,
) -> (ObjectListing, Option<String>) {
    let mut listing = ObjectListing::default();
    let mut token: Option<String> = None;
    loop {
        let mut request = client
            .list_objects_v2()
            .bucket(bucket)
            .max_keys(LIST_PAGE_SIZE as i32)
            .set_continuation_token(token.clone());
        if !prefix.is_empty() {
            request = request.prefix(prefix);
        }
        if delimited {
            request = request.delimiter("/");
        }
        let out = match request.send().await {
            Ok(out) => out,
            Err(e) => {
                let error = format!(
                    "ListObjectsV2 of s3://{bucket}/{prefix} failed: {}",
                    aws_sdk_s3::error::DisplayErrorContext(&e)
                );
                return (listing, Some(error));
            }
        };
        listing.requests += 1;
        listing.objects.extend(
            out.contents()
                .iter()
                .filter_map(|o| o.key())
                .map(str::to_string),
        );
        listing.prefixes.extend(
            out.common_prefixes()
                .iter()
                .filter_map(|p| p.prefix())
                .map(str::to_string),
        );
        let next = match out.next_continuation_token() {
            Some(next) if out.is_truncated() == Some(true) => next.to_string(),
            _ => return (listing, None),
        };
        // A server that hands back the same token would make this loop forever.
        if token.as_deref() == Some(next.as_str()) {
            let error =
                format!("ListObjectsV2 of s3://{bucket}/{prefix} repeated its continuation token");
            return (listing, Some(error));
        }
        token = Some(next);
    }
}

fn take_failure(st: &mut State, operation: &str) -> Option<InjectedFailure> {
    let index = st.failures.iter().position(|(op, _)| op == operation)?;
    st.failures.remove(index).map(|(_, failure)| failure)
}

/// The failure that [`SgwStandIn::fail_refreshes_of`] set for the share that a
/// `RefreshCache` request names, if any.
fn share_failure(st: &State, operation: &str, body: &Value) -> Option<InjectedFailure> {
    if operation != "RefreshCache" {
        return None;
    }
    let share = body.get("FileShareARN").and_then(Value::as_str)?;
    st.failing_shares.get(share).copied()
}

fn dispatch(
    st: &mut State,
    operation: &str,
    region: &str,
    input: &Map<String, Value>,
    pending: &mut Option<PendingRefresh>,
) -> Result<Value, ApiError> {
    match operation {
        "ListFileShares" => list_file_shares(st, region, input),
        "DescribeNFSFileShares" => describe_file_shares(st, region, input, ShareKind::Nfs),
        "DescribeSMBFileShares" => describe_file_shares(st, region, input, ShareKind::Smb),
        "RefreshCache" => refresh_cache(st, region, input, pending),
        _ => Err(ApiError::unknown_operation()),
    }
}

// ---- input decoding: a wrong JSON type is a SerializationException, as in the real
// ---- service; `null` counts as absent.

fn opt_string(input: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    match input.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::serialization(format!("{key} must be a string"))),
    }
}

fn opt_i64(input: &Map<String, Value>, key: &str) -> Result<Option<i64>, ApiError> {
    match input.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| ApiError::serialization(format!("{key} must be an integer"))),
    }
}

fn opt_bool(input: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match input.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::serialization(format!("{key} must be a boolean"))),
    }
}

fn opt_string_list(input: &Map<String, Value>, key: &str) -> Result<Option<Vec<String>>, ApiError> {
    match input.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::serialization(format!("{key} must be a list of strings"))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(ApiError::serialization(format!("{key} must be a list"))),
    }
}

fn list_repr(items: &[String]) -> String {
    format!("[{}]", items.join(", "))
}

// ---- operations ----

/// `ListFileShares {GatewayARN?, Limit?, Marker?}`.
fn list_file_shares(
    st: &mut State,
    region: &str,
    input: &Map<String, Value>,
) -> Result<Value, ApiError> {
    let gateway = opt_string(input, "GatewayARN")?;
    let limit = opt_i64(input, "Limit")?;
    let marker = opt_string(input, "Marker")?;

    if let Some(limit) = limit {
        if !(1..=MAX_LIST_LIMIT).contains(&limit) {
            let bound = if limit < 1 {
                "greater than or equal to 1".to_string()
            } else {
                format!("less than or equal to {MAX_LIST_LIMIT}")
            };
            return Err(ApiError::validation(format!(
                "Value '{limit}' at 'limit' failed to satisfy constraint: Member must have value {bound}"
            )));
        }
    }
    if let Some(marker) = &marker {
        if marker.is_empty() || marker.chars().count() > MAX_MARKER_CHARS {
            return Err(ApiError::validation(format!(
                "Value '{marker}' at 'marker' failed to satisfy constraint: \
                 Member must have length between 1 and {MAX_MARKER_CHARS}"
            )));
        }
    }
    if let Some(gateway) = &gateway {
        // A gateway of another region is not found here, as in AWS.
        if !st.gateway_exists(gateway) || region_of(gateway) != region {
            return Err(ApiError::gateway_not_found(gateway));
        }
    }
    let after = match &marker {
        None => None,
        Some(m) => Some(st.decode_marker(m).ok_or_else(|| {
            ApiError::invalid_request(
                "InvalidParameters",
                "The specified marker is not valid.",
                vec![("marker", m.clone())],
            )
        })?),
    };

    let page_size = match limit {
        Some(limit) => (limit as usize).min(st.max_page_size),
        None => st.max_page_size,
    }
    .max(1);
    // Shares are kept in creation order, so a marker ("after seq N") is stable.
    // Only the shares of this region's gateways.
    let mut matching = st.shares.iter().filter(|s| {
        region_of(&s.gateway_arn) == region
            && gateway.as_deref().is_none_or(|g| s.gateway_arn == g)
            && after.is_none_or(|a| s.seq > a)
    });
    let page: Vec<&Share> = matching.by_ref().take(page_size).collect();
    let more = matching.next().is_some();

    let infos: Vec<Value> = page
        .iter()
        .map(|s| {
            json!({
                "FileShareType": s.kind.as_str(),
                "FileShareARN": s.arn,
                "FileShareId": s.id,
                "FileShareStatus": "AVAILABLE",
                "GatewayARN": s.gateway_arn,
            })
        })
        .collect();
    let mut output = Map::new();
    if let Some(marker) = marker {
        output.insert("Marker".into(), Value::String(marker));
    }
    if more {
        if let Some(last) = page.last() {
            output.insert(
                "NextMarker".into(),
                Value::String(st.encode_marker(last.seq)),
            );
        }
    }
    output.insert("FileShareInfoList".into(), Value::Array(infos));
    Ok(Value::Object(output))
}

/// `DescribeNFSFileShares` / `DescribeSMBFileShares {FileShareARNList}`. One unknown ARN
/// fails the whole call, as in the real service.
fn describe_file_shares(
    st: &mut State,
    region: &str,
    input: &Map<String, Value>,
    kind: ShareKind,
) -> Result<Value, ApiError> {
    let arns = opt_string_list(input, "FileShareARNList")?
        .ok_or_else(|| ApiError::not_null("fileShareARNList"))?;
    if arns.is_empty() || arns.len() > MAX_DESCRIBE_ARNS {
        let bound = if arns.is_empty() {
            "greater than or equal to 1".to_string()
        } else {
            format!("less than or equal to {MAX_DESCRIBE_ARNS}")
        };
        return Err(ApiError::validation(format!(
            "Value '{}' at 'fileShareARNList' failed to satisfy constraint: Member must have length {bound}",
            list_repr(&arns)
        )));
    }
    let mut infos = Vec::with_capacity(arns.len());
    for arn in &arns {
        let share = st
            .share_in(region, arn)
            .ok_or_else(|| ApiError::share_not_found(arn))?;
        if share.kind != kind {
            // A share of the other protocol exists: not "gone", so not FileShareNotFound.
            return Err(ApiError::invalid_request(
                "InvalidParameters",
                format!(
                    "The specified file share is not an {} file share.",
                    kind.as_str()
                ),
                vec![("fileShareArn", arn.clone())],
            ));
        }
        infos.push(share_info(share));
    }
    let key = match kind {
        ShareKind::Nfs => "NFSFileShareInfoList",
        ShareKind::Smb => "SMBFileShareInfoList",
    };
    Ok(json!({ key: infos }))
}

/// The bucket of `arn:aws:s3:::bucket[/prefix/]`, if it has that form.
fn bucket_of(location_arn: &str) -> Option<&str> {
    let rest = location_arn.strip_prefix("arn:aws:s3:::")?;
    rest.split('/').next().filter(|b| !b.is_empty())
}

fn share_info(s: &Share) -> Value {
    let name = bucket_of(&s.location_arn).unwrap_or(&s.id).to_string();
    let mut info = json!({
        "FileShareARN": s.arn,
        "FileShareId": s.id,
        "FileShareStatus": "AVAILABLE",
        "GatewayARN": s.gateway_arn,
        "LocationARN": s.location_arn,
        "Path": format!("/{name}"),
        "FileShareName": name,
        "Role": format!("arn:aws:iam::{ACCOUNT_ID}:role/StorageGatewayBucketAccess"),
        "DefaultStorageClass": "S3_STANDARD",
        "ObjectACL": "bucket-owner-full-control",
        "ReadOnly": false,
        "GuessMIMETypeEnabled": true,
        "RequesterPays": false,
        "KMSEncrypted": false,
        "EncryptionType": "SseS3",
        "Tags": [],
    });
    if let Value::Object(map) = &mut info {
        match s.kind {
            ShareKind::Nfs => {
                map.insert(
                    "NFSFileShareDefaults".into(),
                    json!({"FileMode": "0666", "DirectoryMode": "0777", "GroupId": 65534, "OwnerId": 65534}),
                );
                map.insert("ClientList".into(), json!(["0.0.0.0/0"]));
                map.insert("Squash".into(), json!("RootSquash"));
            }
            ShareKind::Smb => {
                map.insert("Authentication".into(), json!("GuestAccess"));
                map.insert("SMBACLEnabled".into(), json!(false));
                map.insert("AccessBasedEnumeration".into(), json!(false));
                map.insert("CaseSensitivity".into(), json!("ClientSpecified"));
                map.insert("OplocksEnabled".into(), json!(true));
            }
        }
    }
    info
}

/// `RefreshCache {FileShareARN, FolderList?, Recursive?}`.
///
/// Checks, in the order the real service applies them:
/// 1. model constraints (framework level, `ValidationException`): FileShareARN present,
///    FolderList 1..=50 items, each 1..=1024 characters;
/// 2. the share exists (`InvalidGatewayRequestException`, `FileShareNotFound`);
/// 3. each folder is a well-formed path relative to the share root (see
///    [`folder_problem`]). These rules are not in the model, so they are the service's
///    own check and answer `InvalidGatewayRequestException` (`InvalidParameters`);
/// 4. in strict mode, the previous accepted call on the share was at least the minimum
///    interval ago, and, in any mode, fewer than two refreshes are in flight on the
///    share (`InvalidGatewayRequestException`; a call that breaks both is counted for
///    both and answered with the interval message).
///
/// Once accepted, a modelled bucket is listed right away; an S3 bucket is listed by the
/// caller through `pending`, after the lock is released.
fn refresh_cache(
    st: &mut State,
    region: &str,
    input: &Map<String, Value>,
    pending: &mut Option<PendingRefresh>,
) -> Result<Value, ApiError> {
    let share_arn =
        opt_string(input, "FileShareARN")?.ok_or_else(|| ApiError::not_null("fileShareARN"))?;
    let folders = opt_string_list(input, "FolderList")?;
    let recursive = opt_bool(input, "Recursive")?.unwrap_or(true);

    if let Some(folders) = &folders {
        if folders.is_empty() || folders.len() > MAX_FOLDERS {
            let bound = if folders.is_empty() {
                "greater than or equal to 1".to_string()
            } else {
                format!("less than or equal to {MAX_FOLDERS}")
            };
            return Err(ApiError::validation(format!(
                "Value '{}' at 'folderList' failed to satisfy constraint: Member must have length {bound}",
                list_repr(folders)
            )));
        }
        if let Some(bad) = folders
            .iter()
            .find(|f| f.is_empty() || f.chars().count() > MAX_FOLDER_CHARS)
        {
            return Err(ApiError::validation(format!(
                "Value '{}' at 'folderList' failed to satisfy constraint: \
                 Member must satisfy constraint: [Member must have length between 1 and {MAX_FOLDER_CHARS}]",
                list_repr(std::slice::from_ref(bad))
            )));
        }
    }
    let Some(share) = st.share_in(region, &share_arn) else {
        return Err(ApiError::share_not_found(&share_arn));
    };
    let location_arn = share.location_arn.clone();
    let gateway_arn = share.gateway_arn.clone();
    for folder in folders.iter().flatten() {
        if let Some(problem) = folder_problem(folder) {
            return Err(ApiError::invalid_request(
                "InvalidParameters",
                format!("The folder name '{folder}' is not valid: {problem}."),
                vec![("folder", folder.clone())],
            ));
        }
    }
    let now = Instant::now();
    let too_soon = st.min_interval.and_then(|min| {
        let since = now.saturating_duration_since(*st.last_accepted.get(&share_arn)?);
        (since < min).then(|| ApiError::too_soon(&share_arn, since, min))
    });
    let busy = st.in_flight_for(&share_arn) >= MAX_REFRESHES_IN_FLIGHT;
    if too_soon.is_some() {
        st.interval_violations += 1;
    }
    if busy {
        st.rejected_refreshes += 1;
    }
    if let Some(error) = too_soon {
        return Err(error);
    }
    if busy {
        return Err(ApiError::too_many_refreshes(&share_arn));
    }

    st.last_accepted.insert(share_arn.clone(), now);
    let notification_id = st.notification_id();
    let folder_list = folders.unwrap_or_else(|| vec!["/".to_string()]);
    let started_at = SystemTime::now();
    let bucket = bucket_in(&st.access_points, &location_arn).unwrap_or_default();
    let source = st.sources.get(&bucket).cloned();
    let mut in_flight = InFlight {
        share_arn: share_arn.clone(),
        gateway_arn,
        notification_id: notification_id.clone(),
        folder_list: folder_list.clone(),
        started_at,
        accepted: now,
        // A held share's refreshes complete only through `complete_refreshes()`.
        base: if st.held_shares.contains(&share_arn) {
            Duration::MAX
        } else {
            st.refresh_duration
        },
        per_object: st.refresh_time_per_object,
        listing: source.is_some(),
        done_at: None,
    };
    if source.is_none() {
        in_flight.schedule(0);
    }
    st.in_flight.push(in_flight);
    st.wake.notify_one();
    let share_prefix = prefix_of(&location_arn);
    let jobs: Vec<FolderJob> = folder_list
        .iter()
        .map(|f| FolderJob::new(&share_prefix, f, recursive))
        .collect();
    st.refreshes.push(RefreshRecord {
        share_arn: share_arn.clone(),
        folder_list,
        recursive,
        notification_id: notification_id.clone(),
        started_at,
        work: ListingWork::default(),
        listing_error: None,
    });

    match source {
        None => {}
        Some(BucketSource::Model(model)) => {
            let outcomes = jobs
                .into_iter()
                .map(|job| FolderOutcome {
                    listing: model.list(&job.key_prefix, !job.recursive),
                    job,
                    error: None,
                })
                .collect();
            finish_refresh(st, &share_arn, &notification_id, outcomes);
        }
        Some(BucketSource::S3(client)) => {
            *pending = Some(PendingRefresh {
                share_arn: share_arn.clone(),
                notification_id: notification_id.clone(),
                bucket,
                client,
                jobs,
            });
        }
    }
    Ok(json!({ "FileShareARN": share_arn, "NotificationId": notification_id }))
}

/// What is wrong with a `FolderList` entry, if anything. A folder is a path relative
/// to the share root: `/` is the root, otherwise `/a/b`, with no trailing `/` ("Do not
/// include / when specifying folder names", RefreshCache docs) and no empty names.
///
/// The leading `/` is this project's convention (the docs' example is `samplefolder`,
/// so the real service may well accept a path without it); the stand-in insists on it
/// so that a client that builds folder paths inconsistently fails here.
fn folder_problem(folder: &str) -> Option<&'static str> {
    if folder == "/" {
        None
    } else if !folder.starts_with('/') {
        Some("a folder path must start with '/', the share root")
    } else if folder.ends_with('/') {
        Some("a folder name must not end with '/'")
    } else if folder.contains("//") {
        Some("a folder path must not contain an empty folder name ('//')")
    } else {
        None
    }
}

/// Applies finished listings to the share's cache (unless the share is gone) and counts
/// their work for the share, the total and the refresh's record.
fn finish_refresh(
    st: &mut State,
    share_arn: &str,
    notification_id: &str,
    outcomes: Vec<FolderOutcome>,
) {
    let mut work = ListingWork::default();
    let mut first_error = None;
    let mut share = st.shares.iter_mut().find(|s| s.arn == share_arn);
    for outcome in outcomes {
        work += ListingWork::of(&outcome.listing);
        match outcome.error {
            Some(error) => {
                first_error.get_or_insert(format!("{}: {error}", outcome.job.folder));
            }
            None => {
                if let Some(share) = share.as_mut() {
                    apply_listing(&mut share.cache, &outcome.job, &outcome.listing);
                }
            }
        }
    }
    *st.work_by_share.entry(share_arn.to_string()).or_default() += work;
    st.total_work += work;
    // Now the duration is known. (Gone if the share was removed or the refresh was
    // forced to complete while S3 was being listed.)
    if let Some(refresh) = st
        .in_flight
        .iter_mut()
        .find(|r| r.notification_id == notification_id)
    {
        refresh.schedule(work.objects_listed);
        st.wake.notify_one();
    }
    // The record is gone if reset_calls() ran while S3 was being listed.
    if let Some(record) = st
        .refreshes
        .iter_mut()
        .rev()
        .find(|r| r.notification_id == notification_id)
    {
        record.work = work;
        record.listing_error = first_error;
    }
}

/// What a `LocationARN` names, and the rest of it (its prefix, possibly empty):
/// `arn:aws:s3:::NAME[/prefix/]` names a bucket or an access point alias (`NAME`);
/// `arn:aws:s3:REGION:ACCOUNT:accesspoint/NAME[/prefix/]` names the access point
/// (`arn:aws:s3:REGION:ACCOUNT:accesspoint/NAME`); a bare alias names itself.
fn location_parts(location_arn: &str) -> Option<(String, &str)> {
    let parts: Vec<&str> = location_arn.splitn(6, ':').collect();
    let (name, rest) = match parts.as_slice() {
        ["arn", _, "s3", "", "", resource] => resource.split_once('/').unwrap_or((resource, "")),
        ["arn", partition, "s3", region, account, resource] => {
            let name_and_rest = resource.strip_prefix("accesspoint/")?;
            let (name, rest) = name_and_rest.split_once('/').unwrap_or((name_and_rest, ""));
            let arn = format!("arn:{partition}:s3:{region}:{account}:accesspoint/{name}");
            return (!name.is_empty()).then_some((arn, rest));
        }
        [bare] if bare.split('/').next()?.ends_with("-s3alias") => {
            bare.split_once('/').unwrap_or((bare, ""))
        }
        _ => return None,
    };
    (!name.is_empty()).then(|| (name.to_string(), rest))
}

/// The bucket that `location_arn` maps: the bucket it names, or the bucket of the
/// access point (ARN or alias) registered with [`SgwStandIn::add_access_point`]. An
/// access point that is not registered maps no bucket.
fn bucket_in(access_points: &HashMap<String, String>, location_arn: &str) -> Option<String> {
    let (name, _) = location_parts(location_arn)?;
    match access_points.get(&name) {
        Some(bucket) => Some(bucket.clone()),
        None if name.starts_with("arn:") || name.ends_with("-s3alias") => None,
        None => Some(name),
    }
}

/// The key prefix of a location (`prefix/` for `arn:aws:s3:::bucket/prefix/` or an
/// access point with that prefix); "" for a whole bucket. A prefix written without its
/// trailing `/` still names a folder.
fn prefix_of(location_arn: &str) -> String {
    let prefix = location_parts(location_arn)
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    if prefix.is_empty() || prefix.ends_with('/') {
        prefix.to_string()
    } else {
        format!("{prefix}/")
    }
}

/// `rel/name`, or `name` at the root.
fn join(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_string()
    } else {
        format!("{rel}/{name}")
    }
}

/// Forgets the cached listings of `rel` and every folder below it.
fn remove_subtree(cache: &mut ShareCache, rel: &str) {
    if rel.is_empty() {
        cache.clear();
        return;
    }
    let below = format!("{rel}/");
    cache.retain(|k, _| k != rel && !k.starts_with(&below));
}

/// Replaces what `listing` covers in the cache: one folder's listing for a delimited
/// listing, the folder's whole subtree for a recursive one. Keys that no path can name
/// (an empty folder name, as in `a//b`) are left out; a key equal to a folder's prefix
/// (a "folder marker" such as `a/`) is the folder itself, not a file.
fn apply_listing(cache: &mut ShareCache, job: &FolderJob, listing: &ObjectListing) {
    let prefix = job.key_prefix.as_str();
    if !job.recursive {
        let fresh = FolderListing {
            objects: listing
                .objects
                .iter()
                .filter_map(|k| k.strip_prefix(prefix))
                .filter(|name| !name.is_empty() && !name.contains('/'))
                .map(str::to_string)
                .collect(),
            subfolders: listing
                .prefixes
                .iter()
                .filter_map(|p| p.strip_prefix(prefix)?.strip_suffix('/'))
                .filter(|name| !name.is_empty() && !name.contains('/'))
                .map(str::to_string)
                .collect(),
        };
        // Cached folders below this one that the new listing does not name (vanished,
        // or never linked in) lose their contents, so that stale contents do not come
        // back when a folder of that name reappears.
        let below = if job.rel.is_empty() {
            String::new()
        } else {
            format!("{}/", job.rel)
        };
        let gone: BTreeSet<String> = cache
            .range::<str, _>((Bound::Included(below.as_str()), Bound::Unbounded))
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(&below))
            .filter_map(|k| k[below.len()..].split('/').next())
            .filter(|name| !name.is_empty() && !fresh.subfolders.contains(*name))
            .map(str::to_string)
            .collect();
        for name in gone {
            remove_subtree(cache, &join(&job.rel, &name));
        }
        cache.insert(job.rel.clone(), fresh);
        return;
    }

    remove_subtree(cache, &job.rel);
    cache.insert(job.rel.clone(), FolderListing::default());
    for key in &listing.objects {
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        let mut segments: Vec<&str> = rest.split('/').collect();
        let name = segments.pop().unwrap_or_default();
        if segments.iter().any(|s| s.is_empty()) {
            continue;
        }
        let mut folder = job.rel.clone();
        for segment in segments {
            cache
                .entry(folder.clone())
                .or_default()
                .subfolders
                .insert(segment.to_string());
            folder = join(&folder, segment);
        }
        let listing = cache.entry(folder).or_default();
        if !name.is_empty() {
            listing.objects.insert(name.to_string());
        }
    }
}

/// The share's cache as a full listing of its bucket (model source), not counted.
fn snapshot_from_model(share: &mut Share, model: &BucketModel) {
    let prefix = prefix_of(&share.location_arn);
    share.cache.clear();
    apply_listing(
        &mut share.cache,
        &FolderJob::new(&prefix, "/", true),
        &model.list(&prefix, false),
    );
}

/// The object keys and folder prefixes reachable from the share root through cached
/// listings.
fn view_of(share: &Share) -> (BTreeSet<String>, BTreeSet<String>) {
    let prefix = prefix_of(&share.location_arn);
    let mut objects = BTreeSet::new();
    let mut folders = BTreeSet::new();
    let mut todo = vec![String::new()];
    while let Some(rel) = todo.pop() {
        // A folder never listed is seen as empty.
        let Some(listing) = share.cache.get(&rel) else {
            continue;
        };
        for name in &listing.objects {
            objects.insert(format!("{prefix}{}", join(&rel, name)));
        }
        for name in &listing.subfolders {
            let child = join(&rel, name);
            folders.insert(format!("{prefix}{child}/"));
            todo.push(child);
        }
    }
    (objects, folders)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_with_milliseconds() {
        let at = |ms: u64| rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(1_604_587_840_056), "2020-11-05T14:50:40.056Z");
        assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
    }

    #[test]
    fn completion_time_grows_with_the_objects_listed() {
        let accepted = Instant::now();
        let mut refresh = InFlight {
            share_arn: "s".into(),
            gateway_arn: "g".into(),
            notification_id: "n".into(),
            folder_list: vec!["/".into()],
            started_at: SystemTime::now(),
            accepted,
            base: Duration::from_millis(100),
            per_object: Duration::from_millis(3),
            listing: true,
            done_at: None,
        };
        assert!(
            !refresh.due(accepted + Duration::from_secs(3600)),
            "still listing"
        );
        refresh.schedule(10);
        assert_eq!(refresh.done_at, Some(accepted + Duration::from_millis(130)));
        assert!(refresh.due(accepted + Duration::from_millis(130)));
        assert!(!refresh.due(accepted + Duration::from_millis(129)));
        refresh.base = Duration::MAX;
        refresh.schedule(0);
        assert_eq!(
            refresh.done_at, None,
            "Duration::MAX never completes on its own"
        );
    }

    #[test]
    fn markers_round_trip_and_reject_garbage() {
        let st = State::new();
        let m = st.encode_marker(42);
        assert_eq!(st.decode_marker(&m), Some(42));
        assert_eq!(st.decode_marker("garbage"), None);
        assert_eq!(st.decode_marker(&format!("{:016x}{:016x}", 42, 0)), None);
        assert_eq!(st.decode_marker(""), None);
    }

    #[test]
    fn ids_are_unique() {
        let mut st = State::new();
        let ids: std::collections::HashSet<String> = (0..10_000).map(|_| st.short_id()).collect();
        assert_eq!(ids.len(), 10_000);
        let nids: std::collections::HashSet<String> =
            (0..10_000).map(|_| st.notification_id()).collect();
        assert_eq!(nids.len(), 10_000);
    }

    #[test]
    fn regions_come_from_the_credential_scope_and_the_arn() {
        assert_eq!(
            credential_scope_region(
                "AWS4-HMAC-SHA256 Credential=test/20260101/eu-west-2/storagegateway/aws4_request, \
                 SignedHeaders=host;x-amz-date, Signature=abc"
            ),
            Some("eu-west-2")
        );
        assert_eq!(credential_scope_region("Bearer x"), None);
        assert_eq!(
            credential_scope_region("AWS4-HMAC-SHA256 Credential=test/20260101"),
            None
        );
        assert_eq!(
            region_of("arn:aws:storagegateway:ap-south-1:1:gateway/sgw-1"),
            "ap-south-1"
        );
        assert_eq!(region_of("gw-made-up"), REGION);
    }

    #[test]
    fn access_point_locations_map_their_registered_bucket() {
        let ap = "arn:aws:s3:us-east-1:123456789012:accesspoint/ap";
        let alias = "ap-0123456789abcdef-s3alias";
        let mut registered = HashMap::new();
        assert_eq!(bucket_in(&registered, ap), None, "never guessed");
        assert_eq!(
            bucket_in(&registered, &format!("arn:aws:s3:::{alias}")),
            None
        );
        registered.insert(ap.to_string(), "b".to_string());
        registered.insert(alias.to_string(), "b".to_string());
        for location in [
            ap.to_string(),
            format!("{ap}/data/"),
            format!("arn:aws:s3:::{alias}/data"),
            alias.to_string(),
            "arn:aws:s3:::b/data/".to_string(),
        ] {
            assert_eq!(
                bucket_in(&registered, &location).as_deref(),
                Some("b"),
                "{location}"
            );
        }
        assert_eq!(prefix_of(&format!("{ap}/data")), "data/");
        assert_eq!(prefix_of(ap), "");
        assert_eq!(prefix_of(&format!("arn:aws:s3:::{alias}/x/y/")), "x/y/");
        assert_eq!(prefix_of("arn:aws:s3:::b/p"), "p/");
        assert_eq!(bucket_in(&registered, "nope"), None);
    }

    #[test]
    fn bucket_is_parsed_from_location() {
        assert_eq!(bucket_of("arn:aws:s3:::b"), Some("b"));
        assert_eq!(bucket_of("arn:aws:s3:::b/p/"), Some("b"));
        assert_eq!(bucket_of("nope"), None);
    }

    #[test]
    fn share_faults_fail_hold_and_reorder() {
        let gateway = "arn:aws:storagegateway:us-east-1:123456789012:gateway/sgw-1";
        let share = "arn:aws:storagegateway:us-east-1:123456789012:share/share-1";
        let state = Mutex::new(State::new());
        {
            let mut st = lock(&state);
            let seq = st.next();
            st.shares.push(Share {
                seq,
                arn: share.into(),
                id: "share-1".into(),
                gateway_arn: gateway.into(),
                kind: ShareKind::Nfs,
                location_arn: "arn:aws:s3:::b".into(),
                cache: ShareCache::new(),
            });
        }
        let refresh = || {
            let body = json!({"FileShareARN": share, "FolderList": ["/"]}).to_string();
            let target = format!("{TARGET_PREFIX}RefreshCache");
            answer::<Infallible>(&state, &target, REGION, true, Ok(Bytes::from(body))).0
        };

        lock(&state)
            .failing_shares
            .insert(share.into(), InjectedFailure::InternalError);
        for _ in 0..3 {
            assert_eq!(refresh(), StatusCode::INTERNAL_SERVER_ERROR);
        }
        {
            let st = lock(&state);
            assert!(st.in_flight.is_empty() && st.refreshes.is_empty());
            assert!(st.calls.iter().all(|c| c.injected && c.status == 500));
        }
        lock(&state).failing_shares.remove(share);
        assert_eq!(refresh(), StatusCode::OK);

        // Held: never completes on its own, only when forced; events list the gateway
        // first when asked to.
        {
            let mut st = lock(&state);
            st.complete_due(Instant::now(), true);
            st.held_shares.insert(share.into());
            st.gateway_first_in_events = true;
        }
        assert_eq!(refresh(), StatusCode::OK);
        let mut st = lock(&state);
        st.complete_due(Instant::now() + Duration::from_secs(86_400), false);
        assert_eq!(st.in_flight.len(), 1, "a held refresh stays in flight");
        st.complete_due(Instant::now(), true);
        let last = st.completions.last().cloned();
        assert_eq!(
            last.map(|c| c.resources),
            Some(vec![gateway.to_string(), share.to_string()])
        );
    }

    #[test]
    fn error_body_shapes() {
        let e = ApiError::share_not_found("x").body();
        assert_eq!(e["__type"], "InvalidGatewayRequestException");
        assert_eq!(e["error"]["errorCode"], "FileShareNotFound");
        assert_eq!(e["error"]["errorDetails"]["fileShareArn"], "x");
        let v = ApiError::validation("x".into()).body();
        assert_eq!(v["__type"], "ValidationException");
        assert!(v.get("error").is_none());
        assert_eq!(
            ApiError::unknown_operation().body(),
            json!({"__type": "UnknownOperationException"})
        );
    }
}
