using System.Collections.Concurrent;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.Logging;

namespace FineTune.Tests.Support;

/// <summary>
/// A real HTTP server (Kestrel) on 127.0.0.1 and a free port, serving what a test puts in <see cref="Routes"/> and
/// counting requests per path. Tests that fetch from it must allow 127.0.0.1 (Remote:AllowedNetworks) and plain
/// http (Remote:AllowHttp): both are refused by default.
/// </summary>
public sealed class LocalHttpServer : IAsyncDisposable
{
    private readonly WebApplication _app;
    public ConcurrentDictionary<string, Func<HttpContext, Task>> Routes { get; } = new();
    public ConcurrentDictionary<string, int> Hits { get; } = new();
    public Uri BaseUri { get; private set; } = null!;

    private LocalHttpServer()
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.WebHost.UseUrls("http://127.0.0.1:0");
        builder.Logging.ClearProviders();
        _app = builder.Build();
        _app.Run(async ctx =>
        {
            var path = ctx.Request.Path.Value ?? "/";
            Hits.AddOrUpdate(path, 1, (_, n) => n + 1);
            if (Routes.TryGetValue(path, out var handler)) await handler(ctx);
            else ctx.Response.StatusCode = 404;
        });
    }

    public static async Task<LocalHttpServer> StartAsync()
    {
        var server = new LocalHttpServer();
        await server._app.StartAsync();
        server.BaseUri = new Uri(server._app.Urls.First().TrimEnd('/') + "/");
        return server;
    }

    public string Url(string path) => new Uri(BaseUri, path.TrimStart('/')).AbsoluteUri;

    public int HitsOf(string path) => Hits.TryGetValue(path, out var n) ? n : 0;

    /// <summary>Serves bytes with a Content-Length (or chunked, without one).</summary>
    public void File(string path, byte[] content, bool chunked = false) => Routes[path] = async ctx =>
    {
        if (!chunked) ctx.Response.ContentLength = content.Length;
        await ctx.Response.Body.WriteAsync(content);
    };

    public void Redirect(string path, string location) => Routes[path] = ctx =>
    {
        ctx.Response.StatusCode = 302;
        ctx.Response.Headers.Location = location;
        return Task.CompletedTask;
    };

    /// <summary>Announces <paramref name="declared"/> bytes, sends fewer, then drops the connection.</summary>
    public void Truncated(string path, byte[] content, long declared) => Routes[path] = async ctx =>
    {
        ctx.Response.ContentLength = declared;
        await ctx.Response.Body.WriteAsync(content);
        await ctx.Response.Body.FlushAsync();
        ctx.Abort();
    };

    /// <summary>Serves every file of a local folder under <paramref name="prefix"/>.</summary>
    public void Folder(string prefix, string folder)
    {
        foreach (var f in Directory.EnumerateFiles(folder))
            File($"{prefix.TrimEnd('/')}/{Path.GetFileName(f)}", System.IO.File.ReadAllBytes(f));
    }

    public async ValueTask DisposeAsync() => await _app.DisposeAsync();
}
