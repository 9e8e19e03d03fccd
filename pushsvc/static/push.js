/* push.js: the browser client for pushsvc. No dependencies.
 *
 * Classic script:  <script src="/push.js"></script>  sets globalThis.PushClient.
 * ES module:       import {PushClient} from '/push.mjs'  (re-exports this file's class).
 *
 *   const client = new PushClient('wss://push.example.com/ws', {uid: 'uid1'});
 *   // or {token: jwt}, or {getToken: async () => (await fetch('/push-token')).text()}
 *   client.on('message', ({data}) => console.log(data));
 *   client.on('state', ({state}) => console.log(state));
 *   client.connect();
 *
 * It reconnects by itself (exponential backoff with full jitter), sends the
 * uid or token as the first frame of every connection (asking getToken for a
 * fresh token each time), and stops for good on the close codes that say
 * retrying cannot help. For pushes kept in history (a ttl) it tracks each
 * channel's position and sends it with the next hello, so the server replays
 * what was missed ({persist: true} keeps positions across page reloads).
 * docs/browser.md describes the events, the states and every close code.
 */
(function (root) {
  'use strict';

  /* What a close code means for the client: 'reconnect', 'refresh' (fetch a
   * fresh token, then reconnect), 'authfailure', 'failed' or 'closed' (the
   * last three are final until the application calls connect() again). */
  function reaction(code, canRefresh) {
    if (code === 4001) return 'authfailure'; // invalid token: the same token will fail again
    if (code === 4002) return canRefresh ? 'refresh' : 'authfailure'; // token expired
    if (code === 4000 || code === 1002 || code === 1003 || code === 1007 || code === 1008 ||
        code === 1009) {
      return 'failed'; // the client sent something the server refuses: a bug, not bad luck
    }
    if (code === 1000 || code === 4009 || (code >= 4100 && code <= 4999)) {
      return 'closed'; // the application (its backend) ended the session: logout, ban
    }
    return 'reconnect'; // 1001 restart, 1006 network, 1011-1013, 4008, 4010, 4029, others
  }

  class PushClient extends EventTarget {
    constructor(url, options) {
      super();
      options = options || {};
      if (options.uid === undefined && options.token === undefined && !options.getToken) {
        throw new TypeError('PushClient needs {uid}, {token} or {getToken}');
      }
      this.url = String(url);
      this.uid = options.uid;
      this.token = options.token;
      this.getToken = options.getToken;
      this.backoffBase = options.backoffBase ?? 500; // ms: first retry within [0, base)
      this.backoffCap = options.backoffCap ?? 30000; // ms: retries never wait longer
      this.stableAfter = options.stableAfter ?? 10000; // ms open before the backoff resets
      this.connectTimeout = options.connectTimeout ?? 10000; // ms for the handshake
      this.state = 'idle';
      this.attempt = 0; // retries since the last stable connection; drives the backoff
      this.connections = 0; // WebSockets opened (handshake completed) so far
      this._ws = null;
      this._run = 0; // bumped by connect() and close(): late callbacks of an old run do nothing
      this._timer = null; // the reconnect delay, or the handshake timeout
      this._stable = null;
      this._wasOffline = false;
      this._onOnline = () => this._online();
      this._onOffline = () => { this._wasOffline = true; };
      // Channel -> [offset, epoch] of the last stored push seen (docs/protocol.md, Recovery).
      this.persist = options.persist || false;
      this._storageKey = typeof this.persist === 'string' ? this.persist
        : 'pushsvc:' + this.url + '|' + (this.uid !== undefined ? String(this.uid) : '');
      this.positions = this._load();
    }

    /* fn(detail) on every `type` event; returns a function that removes it. */
    on(type, fn) {
      const listener = (event) => fn.call(this, event.detail);
      this.addEventListener(type, listener);
      return () => this.removeEventListener(type, listener);
    }

    /* Connect (again): also the way out of 'failed' after an auth failure. */
    connect() {
      if (this.state === 'connecting' || this.state === 'open') return this;
      this._clearTimers();
      this.attempt = 0;
      if (root.addEventListener) {
        root.addEventListener('online', this._onOnline);
        root.addEventListener('offline', this._onOffline);
      }
      this._open();
      return this;
    }

    /* Close for good: no reconnect until connect() is called again. */
    close() {
      this._run++;
      this._drop(1000, 'closed by the application');
      this._finish('closed');
      return this;
    }

    async _open() {
      const run = ++this._run;
      this._clearTimers();
      this._setState('connecting');
      let credential = this.uid !== undefined ? String(this.uid) : this.token;
      if (this.getToken) {
        try {
          credential = await this.getToken();
        } catch (error) {
          if (run !== this._run) return;
          this._emit('error', {error});
          this._retry(0); // the token endpoint may be down too: back off
          return;
        }
        if (run !== this._run) return; // close() or connect() while we waited
      }
      let ws;
      try {
        ws = new WebSocket(this.url);
      } catch (error) { // a malformed URL: retrying cannot help
        this._emit('error', {error});
        this._finish('failed');
        return;
      }
      this._ws = ws;
      // A handshake that hangs (a black-holed network) counts as a failed attempt.
      this._timer = setTimeout(() => ws.close(), this.connectTimeout);
      ws.onopen = () => {
        if (ws !== this._ws) return;
        clearTimeout(this._timer);
        ws.send(this._hello(credential)); // who we are, first thing on every connection
        this.connections++;
        this._wasOffline = false;
        this._stable = setTimeout(() => { this.attempt = 0; }, this.stableAfter);
        this._setState('open');
        this._emit('open', {url: this.url});
      };
      ws.onmessage = (event) => {
        if (ws === this._ws) this._received(event.data);
      };
      ws.onclose = (event) => {
        if (ws === this._ws) this._closed(event);
      };
    }

    /* The first frame: a hello with the positions to resume from (asks for envelopes too). */
    _hello(credential) {
      const key = this.uid !== undefined && !this.getToken ? 'uid' : 'token';
      return JSON.stringify({[key]: credential, since: this.positions});
    }

    /* A plain push is its text; a stored one comes in an envelope with its position. */
    _received(data) {
      if (typeof data === 'string' && data.startsWith('{"pushsvc":')) {
        let m = null;
        try { m = JSON.parse(data); } catch (e) { /* not ours after all: plain text */ }
        if (m && m.pushsvc === 'msg') {
          const known = this.positions[m.ch];
          if (!known || known[1] !== m.ep || m.off > known[0]) this._track(m.ch, m.off, m.ep);
          this._emit('message', {data: m.data, channel: m.ch, offset: m.off, epoch: m.ep});
          return;
        }
        if (m && m.pushsvc === 'recovery') {
          // Resume from the stream's position either way: after a failure the
          // application refetches its state, and only newer pushes matter.
          if (m.off !== null) this._track(m.ch, m.off, m.ep);
          const detail = {channel: m.ch, offset: m.off, epoch: m.ep};
          this._emit(m.recovered ? 'recovered' : 'recoverfailed', detail);
          return;
        }
      }
      this._emit('message', {data});
    }

    _track(channel, offset, epoch) {
      this.positions[channel] = [offset, epoch];
      if (!this.persist) return;
      try {
        root.sessionStorage.setItem(this._storageKey, JSON.stringify(this.positions));
      } catch (e) { /* storage full or disabled: positions live as long as the page */ }
    }

    _load() {
      if (!this.persist) return {};
      try {
        return JSON.parse(root.sessionStorage.getItem(this._storageKey)) || {};
      } catch (e) {
        return {};
      }
    }

    _closed(event) {
      this._ws = null;
      this._clearTimers();
      const code = event.code;
      const reason = event.reason;
      const what = reaction(code, Boolean(this.getToken));
      const reconnect = what === 'reconnect' || what === 'refresh';
      this._emit('close', {code, reason, wasClean: event.wasClean, reconnect});
      if (what === 'authfailure') this._emit('authfailure', {code, reason});
      if (reconnect) this._retry(code);
      else this._finish(what === 'closed' ? 'closed' : 'failed');
    }

    /* Wait a random time in [0, min(cap, base * 2^attempt)) ("full jitter"), then connect. */
    _retry(code) {
      if (code === 1001) this.attempt = Math.max(this.attempt, 2); // a restart: spread everyone out
      if (code === 4029) this.attempt += 3; // too many connections: slow down more
      const ceiling = Math.min(this.backoffCap, this.backoffBase * 2 ** this.attempt);
      // After 4029 wait at least half the ceiling; otherwise anywhere from 0 to it.
      const delay = code === 4029 ? ceiling * (0.5 + Math.random() / 2) : ceiling * Math.random();
      this.attempt = Math.min(this.attempt + 1, 30);
      this._setState('reconnecting', {delay: Math.round(delay), attempt: this.attempt});
      const run = this._run;
      this._timer = setTimeout(() => { if (run === this._run) this._open(); }, delay);
    }

    /* Back online: retry now instead of waiting out the backoff, and replace a
     * connection that lived through the outage (it is most likely dead, and the
     * browser may take minutes to notice). */
    _online() {
      if (this.state === 'reconnecting') {
        this._open();
      } else if (this.state === 'open' && this._wasOffline) {
        this._drop(1000, 'reconnecting after a network change');
        this._open();
      }
    }

    _drop(code, reason) {
      const ws = this._ws;
      this._ws = null; // its close event now belongs to nobody
      this._clearTimers();
      if (ws) ws.close(code, reason);
    }

    _finish(state) {
      this._clearTimers();
      if (root.removeEventListener) {
        root.removeEventListener('online', this._onOnline);
        root.removeEventListener('offline', this._onOffline);
      }
      this._setState(state);
    }

    _clearTimers() {
      clearTimeout(this._timer);
      clearTimeout(this._stable);
      this._timer = this._stable = null;
    }

    _setState(state, extra) {
      if (state === this.state) return;
      const previous = this.state;
      this.state = state;
      this._emit('state', Object.assign({state, previous}, extra));
    }

    _emit(type, detail) {
      this.dispatchEvent(new CustomEvent(type, {detail}));
    }
  }

  PushClient.reaction = reaction;
  root.PushClient = PushClient;
})(globalThis);
