//! The host's page in a real browser: Debian's headless Chromium, driven
//! through chromedriver by fantoccini (WebDriver), against a running
//! Steward whose fake workers do real allocations. The charts have data
//! points, the NODES table shows `/state/host`'s numbers, an allocation
//! that finishes after the page loaded appears without a reload (the
//! page's script), the pointer on a chart shows the values `/state/load`
//! has for that second, the costs shown (by function, and each worker's so
//! far) are the export's, a browser logs in with the read token, and light
//! and dark screenshots are saved under `target/page/`. `cargo xtask test` installs `chromium` and
//! `chromium-driver` as root; without them this test fails, naming what is
//! missing.

mod support;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use steward_devserver::FunctionOptions;

/// The browsers the page is tested in, each through its WebDriver server.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// Debian's `chromium` and `chromium-driver`.
    Chromium,
    /// Debian's `firefox-esr` and Mozilla's `geckodriver` (from crates.io:
    /// Debian has none), installed by `cargo xtask test` under /usr/local.
    Firefox,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Chromium => "chromium",
            Kind::Firefox => "firefox",
        }
    }
    fn browser(self) -> &'static str {
        match self {
            Kind::Chromium => "/usr/bin/chromium",
            Kind::Firefox => "/usr/bin/firefox-esr",
        }
    }
    fn driver(self) -> &'static str {
        match self {
            Kind::Chromium => "/usr/bin/chromedriver",
            Kind::Firefox => "/usr/local/bin/geckodriver",
        }
    }
    fn install_hint(self) -> &'static str {
        match self {
            Kind::Chromium => "install Debian's chromium and chromium-driver",
            Kind::Firefox => {
                "install Debian's firefox-esr and `cargo install geckodriver --root /usr/local`"
            }
        }
    }
    /// The session's capabilities; `dark`: the page is asked for its dark scheme.
    fn capabilities(self, dark: bool) -> serde_json::Map<String, serde_json::Value> {
        let mut caps = serde_json::Map::new();
        match self {
            Kind::Chromium => {
                let mut args = vec![
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1280,2400",
                ];
                if dark {
                    args.push("--force-dark-mode");
                    args.push("--blink-settings=preferredColorScheme=0");
                }
                caps.insert(
                    "goog:chromeOptions".into(),
                    json!({"binary": self.browser(), "args": args}),
                );
            }
            Kind::Firefox => {
                // 0: dark, 1: light (what the page's media query sees).
                let scheme = if dark { 0 } else { 1 };
                caps.insert(
                    "moz:firefoxOptions".into(),
                    json!({
                        "binary": self.browser(),
                        "args": ["-headless", "--width=1280", "--height=2400"],
                        "prefs": {"layout.css.prefers-color-scheme.content-override": scheme},
                    }),
                );
            }
        }
        caps
    }
}

/// A WebDriver server on a port of its own, killed when dropped.
struct Driver {
    kind: Kind,
    child: Child,
    url: String,
}

impl Driver {
    fn start(kind: Kind) -> Result<Driver> {
        for needed in [kind.browser(), kind.driver()] {
            ensure!(
                Path::new(needed).is_file(),
                "{needed} is missing: {} (cargo xtask test does, as root)",
                kind.install_hint()
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(kind.driver())
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", kind.driver()))?;
        let driver = Driver {
            kind,
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(
                Instant::now() < deadline,
                "{} did not listen within 30 s",
                kind.driver()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(driver)
    }

    /// A headless browser session; `dark`: the page is asked for its dark scheme.
    async fn browser(&self, dark: bool) -> Result<Client> {
        ClientBuilder::rustls()?
            .capabilities(self.kind.capabilities(dark))
            .connect(&self.url)
            .await
            .with_context(|| format!("a {} session", self.kind.name()))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `script` in the page until `done` accepts its answer or `limit`
/// passes; the last answer. (The page swaps its body every two seconds:
/// what is read is read in one script.)
async fn until_script(
    c: &Client,
    script: &str,
    limit: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + limit;
    loop {
        let answer = c.execute(script, vec![]).await?;
        if done(&answer) || Instant::now() > deadline {
            return Ok(answer);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `page-light.png` (Chromium: the ones in `docs/`), `page-firefox-light.png`.
fn shot_name(kind: Kind, scheme: &str) -> String {
    match kind {
        Kind::Chromium => format!("page-{scheme}.png"),
        Kind::Firefox => format!("page-{}-{scheme}.png", kind.name()),
    }
}

fn screenshots_dir() -> Result<PathBuf> {
    let dir = support::repo_root().join("target/page");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The `data-v` numbers of the NODES row `resource`, as the browser sees
/// them (read in one script: the page swaps its body every two seconds, and
/// an element found before a swap is gone after it).
async fn row(c: &Client, resource: &str) -> Result<Vec<f64>> {
    let cells = c
        .execute(
            "return Array.from(document.querySelectorAll(arguments[0])).map(td => td.dataset.v)",
            vec![json!(format!(
                "#node-resources tr[data-resource=\"{resource}\"] td"
            ))],
        )
        .await?;
    cells
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            let v = v.as_str().unwrap_or_default();
            v.parse::<f64>().with_context(|| format!("{v:?}"))
        })
        .collect()
}

/// The ids `/state/allocations` lists.
async fn allocation_ids(steward: &support::AgentProc) -> Result<Vec<String>> {
    allocation_ids_with(steward, None).await
}

/// The same, with the read token `token` where one is set.
async fn allocation_ids_with(
    steward: &support::AgentProc,
    token: Option<&str>,
) -> Result<Vec<String>> {
    let url = format!(
        "{}/state/allocations",
        steward.monitoring_url.as_deref().context("url")?
    );
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let allocs: serde_json::Value = req.send().await?.json().await?;
    Ok(allocs["allocations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["id"].as_str().map(String::from))
        .collect())
}

/// A price card (the config file's `steward.price_card`), so that costs
/// are not all zero.
const CARD: &str = "currency = \"USD\"\nscale = 6\nper_task = 100\nper_cpu_core_second = 20\nper_mb_second = 1\nper_wall_second = 3\n";

/// The cost `steward usage export` gives function `key`
/// (`namespace/application/function`), in minor units.
fn exported_cost(steward: &support::AgentProc, key: &str) -> Result<i64> {
    let key_of = |r: &serde_json::Value| {
        let part = |k: &str| r[k].as_str().unwrap_or("").to_string();
        format!(
            "{}/{}/{}",
            part("namespace"),
            part("application"),
            part("function")
        )
    };
    Ok(support::usage_export(steward.data_dir.path())?
        .iter()
        .filter(|r| key_of(r) == key)
        .filter_map(|r| r["cost_minor"].as_i64())
        .sum())
}

/// The pointer on the allocations chart, at the latest second in which an
/// allocation finished: the tip names that second and each line with the
/// value `/state/load` has for it. (A swap of the page's body between
/// placing the pointer and reading the tip moves the tip's second: tried
/// again.)
async fn hover_shows_the_values(c: &Client, steward: &support::AgentProc) -> Result<()> {
    let mut tries = Vec::new();
    for _ in 0..5 {
        let (_, load) = steward.get_json("/state/load?range=hour").await?;
        let points = load["points"].as_array().cloned().unwrap_or_default();
        let target = points
            .iter()
            .rev()
            .find(|p| p["value"][1].as_f64().unwrap_or(0.0) >= 1.0)
            .context("no second with a finished allocation")?;
        let at = target["at_unix_s"].as_u64().context("at")?;
        let Some(tip) = hover_at(c, at).await? else {
            tries.push(format!("{at}: no tip"));
            continue;
        };
        let (shown_at, text) = tip;
        if shown_at != at {
            tries.push(format!("{at}: {text:?}"));
            continue;
        }
        ensure!(text.contains(" UTC · "), "{text}");
        for (k, field) in ["running", "finished", "failed"].iter().enumerate() {
            let want = target["value"][k].as_f64().context("value")?;
            let shown = text
                .split(" · ")
                .find_map(|part| part.strip_prefix(&format!("{field} ")))
                .with_context(|| format!("{field} not in the tip {text:?}"))?;
            ensure!(
                shown == format!("{want:.0}"),
                "the tip says {field} {shown} at {at}, /state/load says {want}"
            );
        }
        return Ok(());
    }
    bail!("the tip never named the second the pointer was put on: {tries:?}")
}

/// Puts the pointer on the allocations chart where second `at` is drawn;
/// the tip's second and text then, if there is a tip.
async fn hover_at(c: &Client, at: u64) -> Result<Option<(u64, String)>> {
    // Where the chart is in the viewport (the page swaps its body every two
    // seconds, so no element is held across calls; the layout stays).
    let place = c
        .execute(
            "const f = document.querySelector('figure.chart'); const r = f.querySelector('svg').getBoundingClientRect(); \
             return [r.left, r.top, r.width, r.height, +f.dataset.t0, +f.dataset.t1]",
            vec![],
        )
        .await?;
    let n = |i: usize| place[i].as_f64().context("the chart's place");
    let (t0, t1) = (n(4)?, n(5)?);
    let x = n(0)? + (at as f64 - t0) / (t1 - t0).max(1.0) * n(2)?;
    use fantoccini::actions::InputSource as _;
    // Off the page first: a move to where the pointer already is fires no
    // event, and the tip of the last try would stay.
    let actions = fantoccini::actions::MouseActions::new("mouse".into())
        .then(fantoccini::actions::PointerAction::MoveTo {
            duration: None,
            x: 0.0,
            y: 0.0,
        })
        .then(fantoccini::actions::PointerAction::MoveTo {
            duration: None,
            x: x.round(),
            y: (n(1)? + n(3)? / 2.0).round(),
        });
    c.perform_actions(actions).await?;
    // The browser may handle the moves after the actions call returned
    // (Firefox does): the tip, once there.
    let tip = until_script(
        c,
        "const t = document.querySelector('figure.chart .tip'); return t ? [t.dataset.t, t.textContent] : null",
        Duration::from_secs(2),
        |tip| !tip.is_null(),
    )
    .await?;
    let Some(shown_at) = tip[0].as_str().and_then(|t| t.parse().ok()) else {
        return Ok(None);
    };
    Ok(Some((
        shown_at,
        tip[1].as_str().unwrap_or_default().to_string(),
    )))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_chromium_shows_live_numbers() -> Result<()> {
    the_page_shows_live_numbers(Kind::Chromium).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_firefox_shows_live_numbers() -> Result<()> {
    the_page_shows_live_numbers(Kind::Firefox).await
}

/// The page in browser `kind`: NODES, live update, charts, values under
/// the pointer, costs, and the light and dark schemes (screenshots).
async fn the_page_shows_live_numbers(kind: Kind) -> Result<()> {
    let driver = Driver::start(kind)?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("steward.yaml");
    let indented: String = CARD.lines().map(|l| format!("    {l}\n")).collect();
    std::fs::write(&config, format!("steward:\n  price_card: |\n{indented}"))?;
    let (plane, steward) = support::fake_setup(
        FunctionOptions::default(),
        &["--config-path", config.to_str().context("path")?],
    )
    .await?;
    let out = plane.invoke_app("fake", "echo", json!(1)).await?;
    ensure!(out.status == "success", "{out:?}");
    let page = format!("{}/", steward.monitoring_url.as_deref().context("url")?);
    let c = driver.browser(false).await?;
    let checked = async {
        c.goto(&page).await?;
        // NODES: the numbers /state/host has.
        let (_, host) = steward.get_json("/state/host").await?;
        let cpu = row(&c, "CPU, cores").await?;
        ensure!(cpu.len() == 5, "{cpu:?}");
        ensure!(
            cpu[0] == host["capacity"]["cpu_count"].as_f64().unwrap_or(-1.0),
            "{cpu:?}"
        );
        let admitted = host["workers"]["admitted"]["cpu_ms_per_sec"]
            .as_f64()
            .unwrap_or(-1.0)
            / 1000.0;
        ensure!(cpu[3] == admitted, "{cpu:?} {host}");
        // An allocation finished after the page loaded appears without a reload.
        let before = allocation_ids(&steward).await?;
        let out = plane.invoke_app("fake", "echo", json!(2)).await?;
        ensure!(out.status == "success", "{out:?}");
        let newest = allocation_ids(&steward)
            .await?
            .into_iter()
            .find(|id| !before.contains(id))
            .context("the new allocation")?;
        ensure!(
            c.find_all(Locator::Css(&format!("tr[data-allocation=\"{newest}\"]")))
                .await?
                .is_empty(),
            "the page knew {newest} before it ran"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let found = c
                .find_all(Locator::Css(&format!("tr[data-allocation=\"{newest}\"]")))
                .await?;
            if !found.is_empty() {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "allocation {newest} never appeared on the open page"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The charts have points, more as the seconds pass (the page
        // swaps in fresh charts by itself).
        let charts = until_script(
            &c,
            "return Array.from(document.querySelectorAll('figure.chart')).map(f => f.dataset.points)",
            Duration::from_secs(30),
            |charts| charts[0].as_str().and_then(|p| p.parse::<usize>().ok()) >= Some(5),
        )
        .await?;
        let charts = charts.as_array().cloned().unwrap_or_default();
        ensure!(charts.len() == 4, "{} charts", charts.len());
        let points = charts[0].as_str().unwrap_or_default();
        ensure!(
            points.parse::<usize>().unwrap_or(0) >= 5,
            "the charts did not fill: {points:?} points"
        );
        // The cost shown for the function is the export's (today's usage:
        // every record of this test ended today).
        c.goto(&page).await?;
        let key = "default/fake/echo";
        let shown: i64 = c
            .execute(
                "const t = document.querySelector(arguments[0]); return t ? t.dataset.costMinor : null",
                vec![json!(format!(
                    "#usage-today tr[data-function=\"{key}\"] td[data-cost-minor]"
                ))],
            )
            .await?
            .as_str()
            .with_context(|| format!("no cost for {key}"))?
            .parse()?;
        let exported = exported_cost(&steward, key)?;
        ensure!(exported > 0, "the card prices the allocations");
        ensure!(
            shown == exported,
            "the page shows {shown}, the export says {exported}"
        );
        // A worker's cost so far is what its records in the export cost.
        // (Read in one script: the page swaps its body every two seconds.)
        let seen = c
            .execute(
                "const r = document.querySelector('#workers tr[data-fe]'); const t = r && r.querySelector('td[data-cost-minor]'); \
                 return t ? [r.dataset.fe, t.dataset.costMinor] : null",
                vec![],
            )
            .await?;
        let fe = seen[0].as_str().context("no worker with a cost")?.to_string();
        let shown: i64 = seen[1].as_str().unwrap_or_default().parse()?;
        let of_worker: i64 = support::usage_export(steward.data_dir.path())?
            .iter()
            .filter(|r| r["function_executor_id"] == fe.as_str())
            .filter_map(|r| r["cost_minor"].as_i64())
            .sum();
        ensure!(
            shown == of_worker && shown > 0,
            "worker {fe}: the page shows {shown} so far, its records cost {of_worker}"
        );
        // Last, so that the screenshot shows the tip under the pointer.
        hover_shows_the_values(&c, &steward).await?;
        std::fs::write(
            screenshots_dir()?.join(shot_name(kind, "light")),
            c.screenshot().await?,
        )?;
        anyhow::Ok(())
    }
    .await;
    c.close().await?;
    checked?;
    let dark = driver.browser(true).await?;
    let shot = async {
        dark.goto(&page).await?;
        let bg = dark
            .execute(
                "return getComputedStyle(document.body).backgroundColor",
                vec![],
            )
            .await?;
        let bg = bg.as_str().unwrap_or_default().to_string();
        std::fs::write(
            screenshots_dir()?.join(shot_name(kind, "dark")),
            dark.screenshot().await?,
        )?;
        if bg != "rgb(13, 17, 23)" {
            bail!("the dark scheme was not applied: background {bg}");
        }
        anyhow::Ok(())
    }
    .await;
    dark.close().await?;
    shot?;
    plane.stop().await;
    Ok(())
}

/// With a read token, Chromium gets the login form; the token typed into
/// it opens the page (a session cookie), and the page's own refresh runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_logs_in_with_the_read_token() -> Result<()> {
    let driver = Driver::start(Kind::Chromium)?;
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("state-token");
    let secret = "a-browser-read-token-0123456789";
    support::write_secret(&token, format!("{secret}\n"))?;
    let (plane, steward) = support::fake_setup(
        FunctionOptions::default(),
        &["--state-token-file", token.to_str().context("path")?],
    )
    .await?;
    let page = format!("{}/", steward.monitoring_url.as_deref().context("url")?);
    let c = driver.browser(false).await?;
    let checked = async {
        c.goto(&page).await?;
        ensure!(
            c.find_all(Locator::Css("#live")).await?.is_empty(),
            "the page without the token"
        );
        let field = c.find(Locator::Css("#login input[name=token]")).await?;
        field.send_keys("not-the-read-token-0000").await?;
        c.find(Locator::Css("#login button")).await?.click().await?;
        // The answer is a new page: read it in one script, once it is there.
        let said = until_script(
            &c,
            "const m = document.getElementById('login-message'); return m ? m.textContent : null",
            Duration::from_secs(10),
            |said| said == "wrong token",
        )
        .await?;
        ensure!(said == "wrong token", "the form said {said}");
        let field = c.find(Locator::Css("#login input[name=token]")).await?;
        field.send_keys(secret).await?;
        c.find(Locator::Css("#login button")).await?.click().await?;
        c.wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css("#live #node-resources"))
            .await
            .context("the page after logging in")?;
        // The page's own refresh reads with the session too: an
        // allocation finished now appears without a reload.
        let before = allocation_ids_with(&steward, Some(secret)).await?;
        let out = plane.invoke_app("fake", "echo", json!(3)).await?;
        ensure!(out.status == "success", "{out:?}");
        let id = allocation_ids_with(&steward, Some(secret))
            .await?
            .into_iter()
            .find(|id| !before.contains(id))
            .context("the new allocation")?;
        c.wait()
            .at_most(Duration::from_secs(30))
            .for_element(Locator::Css(&format!("tr[data-allocation=\"{id}\"]")))
            .await
            .context("the new allocation on the logged-in page")?;
        anyhow::Ok(())
    }
    .await;
    c.close().await?;
    checked?;
    plane.stop().await;
    Ok(())
}
