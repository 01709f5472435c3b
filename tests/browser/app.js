// The page of tests/test_client_browser.py: the OpenFeature web SDK with the OFREP web provider,
// pointed at a flagproxy on another origin. It renders the flags named in ?flags= into #flags and
// renders again on every ConfigurationChanged. What the test reads:
//   #status                  "loading", then "ready" or "error: <message>"
//   #flags                   one <li data-flag=KEY> per flag: "KEY: " + JSON of {value, variant, reason, errorCode}
//   window.renders           [{at: epoch ms, flags: {...}}], one entry per render
//   window.waitForRender(n)  a promise of the first render after the first n (or null at the timeout)
import { OpenFeature, ProviderEvents } from '@openfeature/web-sdk';
import { OFREPWebProvider } from '@openfeature/ofrep-web-provider';

const params = new URLSearchParams(window.location.search);
const baseUrl = params.get('baseUrl');
const clientKey = params.get('key');
const flags = (params.get('flags') || '').split(',').filter(Boolean);
const context = JSON.parse(params.get('context') || '{}');

const statusNode = document.getElementById('status');
const listNode = document.getElementById('flags');
const waiters = [];
window.renders = [];
window.providerEvents = [];

window.waitForRender = (n, timeoutMs) =>
  new Promise((resolve) => {
    if (window.renders.length > n) {
      resolve(window.renders[n]);
      return;
    }
    const waiter = { n, resolve };
    waiters.push(waiter);
    setTimeout(() => {
      const i = waiters.indexOf(waiter);
      if (i >= 0) {
        waiters.splice(i, 1);
        resolve(null);
      }
    }, timeoutMs);
  });

function details(client, key) {
  // the type of each flag is told by its fallback: ?flags=KEY:boolean|string|number|object
  const [name, type] = key.split(':');
  const read = {
    boolean: () => client.getBooleanDetails(name, false),
    number: () => client.getNumberDetails(name, -1),
    object: () => client.getObjectDetails(name, {}),
    string: () => client.getStringDetails(name, 'fallback'),
  }[type || 'string'];
  const d = read();
  return [name, { value: d.value, variant: d.variant ?? null, reason: d.reason ?? null, errorCode: d.errorCode ?? null }];
}

function render(client) {
  const values = Object.fromEntries(flags.map((key) => details(client, key)));
  listNode.replaceChildren(
    ...Object.entries(values).map(([name, d]) => {
      const item = document.createElement('li');
      item.dataset.flag = name;
      item.textContent = `${name}: ${JSON.stringify(d)}`;
      return item;
    }),
  );
  const entry = { at: Date.now(), flags: values };
  window.renders.push(entry);
  for (const waiter of [...waiters]) {
    if (window.renders.length > waiter.n) {
      waiters.splice(waiters.indexOf(waiter), 1);
      waiter.resolve(window.renders[waiter.n]);
    }
  }
}

async function main() {
  const client = OpenFeature.getClient();
  for (const name of ['Ready', 'Error', 'Stale', 'ConfigurationChanged']) {
    client.addHandler(ProviderEvents[name], (event) => {
      window.providerEvents.push({ at: Date.now(), type: name, message: event?.message ?? null });
    });
  }
  client.addHandler(ProviderEvents.ConfigurationChanged, () => render(client));
  await OpenFeature.setContext(context);
  const provider = new OFREPWebProvider({
    baseUrl,
    headers: [['Authorization', `Bearer ${clientKey}`]],
    changeDetection: 'sse',
    pollInterval: 0,
    timeoutMs: 5000,
  });
  await OpenFeature.setProviderAndWait(provider);
  render(client);
  statusNode.textContent = 'ready';
}

main().catch((error) => {
  statusNode.textContent = `error: ${error?.name ?? ''} ${error?.message ?? error}`;
});
